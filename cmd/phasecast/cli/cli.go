package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/user"
	"strings"

	"github.com/rs/zerolog"
	"github.com/spf13/cobra"

	"github.com/phasecast/phasecast/internal/config"
	"github.com/phasecast/phasecast/schema"
)

// Exit codes, as documented in the README.
const (
	ExitOK           = 0
	ExitError        = 1
	ExitTimeout      = 2 // contract: timed out waiting for acknowledgements
	ExitPrecondition = 3 // a precondition returned a row
	ExitUnsafe       = 4 // the contract would break something: old code, NOT NULL, dependents
	ExitDDLTimeout   = 5 // contract: the DDL could not take its locks before --ddl-timeout
)

// exitError carries an exit code other than 1 through cobra.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

// withCode attaches an exit code to err.
func withCode(code int, err error) error { return &exitError{code: code, err: err} }

// exitCode maps an error to the command's exit code.
func exitCode(err error) int {
	var ee *exitError
	switch {
	case err == nil:
		return ExitOK
	case errors.As(err, &ee):
		return ee.code
	case errors.Is(err, schema.ErrPrecondition):
		return ExitPrecondition
	case errors.Is(err, schema.ErrUnsafe):
		return ExitUnsafe
	case errors.Is(err, schema.ErrAckTimeout):
		return ExitTimeout
	case errors.Is(err, schema.ErrDDLTimeout):
		return ExitDDLTimeout
	}
	return ExitError
}

// globals are the connection settings every command shares.
type globals struct {
	databaseURL    string
	amqpURL        string
	schema         string
	exchangePrefix string
	logFormat      string
	logLevel       string
	stdout, stderr io.Writer
}

// Main runs the phasecast command with args and returns its exit code.
// Errors are printed as one line on stderr, never as a stack trace.
func Main(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	g := &globals{stdout: stdout, stderr: stderr}
	root := newRoot(g)
	root.SetArgs(args)
	err := root.ExecuteContext(ctx)
	if err != nil {
		// Whatever a driver or the broker put in the error, no password
		// of the configured URLs, nor of any URL it quotes, is printed.
		fmt.Fprintf(stderr, "phasecast: %s\n", oneLine(config.RedactError(err, g.databaseURL, g.amqpURL).Error()))
	}
	return exitCode(err)
}

// oneLine keeps an error message on a single line for scripts and logs;
// multi-line detail belongs in --json output.
func oneLine(s string) string {
	return strings.Join(strings.Fields(strings.ReplaceAll(s, "\n", "; ")), " ")
}

func newRoot(g *globals) *cobra.Command {
	root := &cobra.Command{
		Use:   "phasecast",
		Short: "Coordinate the contract step of zero-downtime schema migrations",
		Long: `phasecast keeps each release's phase (expand → migrate → contract) in PostgreSQL,
pushes every change to the services' embedded agents over RabbitMQ, and drops
removed columns only after every live agent has acknowledged that it no longer
uses them.`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	pf := root.PersistentFlags()
	pf.StringVar(&g.databaseURL, "database-url", config.Env(config.EnvDatabaseURL, config.DefaultDatabaseURL), "PostgreSQL URL ($"+config.EnvDatabaseURL+")")
	pf.StringVar(&g.amqpURL, "amqp-url", config.Env(config.EnvAMQPURL, config.DefaultAMQPURL), "RabbitMQ URL, or a comma-separated list of a cluster's nodes ($"+config.EnvAMQPURL+")")
	pf.StringVar(&g.schema, "schema", config.Env(config.EnvSchema, config.DefaultSchema), "PostgreSQL schema of the versioning store ($"+config.EnvSchema+")")
	pf.StringVar(&g.exchangePrefix, "exchange-prefix", config.Env(config.EnvExchangePrefix, config.DefaultExchangePrefix), "prefix of the AMQP exchange and queue names ($"+config.EnvExchangePrefix+")")
	pf.StringVar(&g.logFormat, "log-format", "console", "log format: console or json")
	pf.StringVar(&g.logLevel, "log-level", "info", "log level: debug, info, warn, error")
	// The defaults shown in --help must not reveal a password.
	for _, name := range []string{"database-url", "amqp-url"} {
		f := pf.Lookup(name)
		f.DefValue = config.Redact(f.DefValue)
	}
	root.AddCommand(
		newMigrateCmd(g),
		newReleaseCmd(g),
		newFlipCmd(g),
		newRollbackCmd(g),
		newStatusCmd(g),
	)
	for _, add := range extraCommands {
		root.AddCommand(add(g))
	}
	// Before the completion command: cobra's binds its writer when made.
	root.SetOut(g.stdout)
	root.SetErr(g.stderr)
	setUpCompletion(root)
	return root
}

// extraCommands are registered by the files that define the daemon,
// runner, demo and bench commands.
var extraCommands []func(*globals) *cobra.Command

// withStore connects to the versioning store, runs fn with it and closes
// it when fn returns: every command's one way to reach the store.
func (g *globals) withStore(ctx context.Context, fn func(*schema.Store) error) error {
	store, err := schema.Open(ctx, g.databaseURL, g.schema)
	if err != nil {
		return err
	}
	defer store.Close()
	return fn(store)
}

// Millisecond timestamps: the interesting intervals are milliseconds. Set
// once, before anything logs: zerolog reads this global on every event, so
// assigning it per command raced when commands run concurrently in one
// process (as the tests run them).
func init() { zerolog.TimeFieldFormat = "2006-01-02T15:04:05.000Z07:00" }

// logger builds the zerolog logger the flags ask for, writing to stderr.
func (g *globals) logger() (zerolog.Logger, error) { return g.loggerTo(g.stderr) }

// loggerTo builds the zerolog logger the flags ask for, writing to w.
func (g *globals) loggerTo(w io.Writer) (zerolog.Logger, error) {
	level, err := zerolog.ParseLevel(g.logLevel)
	if err != nil {
		return zerolog.Nop(), fmt.Errorf("--log-level: %w", err)
	}
	switch g.logFormat {
	case "json":
	case "console":
		w = zerolog.ConsoleWriter{Out: w, TimeFormat: "15:04:05.000"}
	default:
		return zerolog.Nop(), fmt.Errorf("--log-format: %q is not console or json", g.logFormat)
	}
	return zerolog.New(w).Level(level).With().Timestamp().Logger(), nil
}

// writeJSON prints v as indented JSON.
func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// defaultActor names who runs a command, for the audit log.
func defaultActor() string {
	name := "unknown"
	if u, err := user.Current(); err == nil {
		name = u.Username
	}
	host, _ := os.Hostname()
	return name + "@" + host
}
