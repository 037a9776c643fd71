// Command novalike runs one instance of the example service: an agent and
// N workers reading and writing the instances table. On SIGTERM or SIGINT
// it stops, prints one JSON line {"service", "queries", "failed", "epoch",
// …} and exits 0. With --state-pub and --status-mac (files from
// 'phasecast keys generate', or $PHASECAST_STATE_PUB and
// $PHASECAST_STATUS_MAC) its agent accepts only states and grants signed by
// the broadcaster and authenticates its statuses.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/rs/zerolog"

	"github.com/phasecast/phasecast/agent"
	"github.com/phasecast/phasecast/examples/novalike"
	"github.com/phasecast/phasecast/internal/config"
	"github.com/phasecast/phasecast/internal/keys"
)

func main() {
	var cfg novalike.Config
	flag.StringVar(&cfg.Service, "service", "novalike", "service name")
	flag.IntVar(&cfg.Workers, "workers", 4, "concurrent workers")
	flag.StringVar(&cfg.Table, "table", "instances", "the instances table, as spelled in the release manifest")
	flag.StringVar(&cfg.DatabaseURL, "database-url", config.Env(config.EnvDatabaseURL, config.DefaultDatabaseURL), "PostgreSQL URL ($"+config.EnvDatabaseURL+")")
	amqpURL := flag.String("amqp-url", config.Env(config.EnvAMQPURL, config.DefaultAMQPURL), "RabbitMQ URL, or a comma-separated list of a cluster's nodes ($"+config.EnvAMQPURL+")")
	schemaName := flag.String("schema", config.Env(config.EnvSchema, config.DefaultSchema), "phasecast's schema ($"+config.EnvSchema+")")
	prefix := flag.String("exchange-prefix", config.Env(config.EnvExchangePrefix, config.DefaultExchangePrefix), "AMQP name prefix ($"+config.EnvExchangePrefix+")")
	releases := flag.String("releases", "L", "comma-separated releases this build knows")
	var keyOpts keys.LoadOptions
	flag.StringVar(&keyOpts.StatePubFile, "state-pub", "", "Ed25519 public key file that checks state and grants ($"+keys.EnvStatePub+" holds the key itself)")
	flag.StringVar(&keyOpts.StatusMACFile, "status-mac", "", "HMAC key file for status messages ($"+keys.EnvStatusMAC+")")
	insecure := flag.Bool("insecure", false, "run without the state public key: "+agent.InsecureAgentWarning)
	flag.Parse()

	// Only the public key and the MAC key reach the agent: it checks
	// states and grants, and authenticates its statuses.
	k, err := keys.Load(keyOpts)
	if err != nil {
		fmt.Fprintln(os.Stderr, "novalike:", err)
		os.Exit(1)
	}
	cfg.Releases = splitComma(*releases)
	cfg.Agent = agent.Config{AMQPURL: *amqpURL, Schema: *schemaName, ExchangePrefix: *prefix, StateKey: k.StatePublic, StatusMACKey: k.StatusMAC, Insecure: *insecure}
	cfg.Logger = zerolog.New(zerolog.ConsoleWriter{Out: os.Stderr}).With().Timestamp().Str("service", cfg.Service).Logger()

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	svc, err := novalike.New(cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "novalike:", err)
		os.Exit(1)
	}
	res, err := svc.Run(ctx)
	if err != nil {
		fmt.Fprintln(os.Stderr, "novalike:", err)
		os.Exit(1)
	}
	_ = json.NewEncoder(os.Stdout).Encode(res)
}

func splitComma(s string) []string {
	return strings.FieldsFunc(s, func(r rune) bool { return r == ',' })
}
