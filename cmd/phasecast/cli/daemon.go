package cli

import (
	"context"
	"errors"
	"time"

	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/spf13/cobra"

	"github.com/phasecast/phasecast/broadcaster"
	"github.com/phasecast/phasecast/internal/amqpx"
	"github.com/phasecast/phasecast/schema"
)

func init() { extraCommands = append(extraCommands, newBroadcastCmd) }

func newBroadcastCmd(g *globals) *cobra.Command {
	var cfg broadcaster.Config
	var keyFlags keyFiles
	cmd := &cobra.Command{
		Use:   "broadcast",
		Short: "Run the broadcaster daemon: relay phase changes to agents, record their status, grant leases",
		Long: `Runs the broadcaster until SIGINT or SIGTERM. It publishes every committed
change from the store's outbox to the state exchange (with publisher confirms),
re-broadcasts the whole state as a beacon, records agent status in the store
and answers each with a lease grant. Run several for availability: one leads
(a PostgreSQL advisory lock), the others stand by and take over within seconds.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := g.logger()
			if err != nil {
				return err
			}
			keys, err := keyFlags.load()
			if err != nil {
				return err
			}
			if keys.StatePrivate == nil && !cfg.Insecure {
				return errors.New("no state key: give --state-key (make one with 'phasecast keys generate'), or run with --insecure and accept its risk")
			}
			if cfg.Insecure {
				log.Warn().Msg(InsecureBroadcastWarning)
			}
			return g.withStore(cmd.Context(), func(store *schema.Store) error {
				cfg.Store, cfg.DatabaseURL, cfg.AMQPURL, cfg.ExchangePrefix, cfg.Logger = store, g.databaseURL, g.amqpURL, g.exchangePrefix, log
				cfg.SigningKey, cfg.StatusMACKey = keys.StatePrivate, keys.StatusMAC
				b, err := broadcaster.New(&cfg)
				if err != nil {
					return err
				}
				// The daemon's registry is the broadcaster's own: the process
				// is the daemon's, so its Go and process metrics go there too.
				b.Metrics().MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
				if err := b.Start(cmd.Context()); err != nil {
					// SIGTERM while starting is a stop asked for, not a failure:
					// Start has undone what it began.
					if cmd.Context().Err() != nil {
						log.Info().Msg("broadcaster stopped while starting")
						return nil
					}
					return err
				}
				log.Info().Str("id", b.ID()).Msg("broadcaster running; stop with SIGINT or SIGTERM")
				<-cmd.Context().Done()
				stopCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				return b.Stop(stopCtx)
			})
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.ID, "id", "", "broadcaster id (default: host-pid-random)")
	f.DurationVar(&cfg.BeaconInterval, "beacon-interval", 3*time.Second, "how often the whole state is re-published")
	f.DurationVar(&cfg.PollInterval, "poll-interval", time.Second, "outbox poll, a safety net under LISTEN/NOTIFY")
	f.DurationVar(&cfg.LeaseDuration, "lease", 10*time.Second, "lease granted to agents with each recorded status")
	f.DurationVar(&cfg.LivenessInterval, "liveness-interval", time.Second, "how often liveness is written and standbys try to lead")
	f.StringVar(&cfg.MetricsAddr, "metrics-addr", "", "serve Prometheus metrics on this address at /metrics, e.g. :9464 (default: off)")
	f.DurationVar(&cfg.BrokerLossTimeout, "broker-loss-timeout", broadcaster.DefaultBrokerLossTimeout, "a leader that reaches no broker for this long steps down, so a standby that reaches one leads")
	f.StringVar(&cfg.StatusQueueType, "status-queue-type", amqpx.StatusQueueClassic, "type the status queue is declared with: classic (non-durable, the faster) or quorum (durable, replicated over a cluster); an existing queue is used as it is")
	f.BoolVar(&cfg.Insecure, "insecure", false, "run without a state key, and let any broker user enrol agents: "+InsecureBroadcastWarning)
	keyFlags.register(cmd)
	return cmd
}

// InsecureBroadcastWarning names the risk of 'phasecast broadcast
// --insecure'.
const InsecureBroadcastWarning = "INSECURE: anyone who can publish to the state exchange can move agents' phases and leases; statuses are accepted from any broker user"
