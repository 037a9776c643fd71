package harness

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/agent"
	"github.com/phasecast/phasecast/broadcaster"
	"github.com/phasecast/phasecast/cmd/phasecast/cli"
	"github.com/phasecast/phasecast/cmd/phasecast/fleet"
	"github.com/phasecast/phasecast/examples/novalike"
	"github.com/phasecast/phasecast/internal/config"
	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/schema"
)

// Config is what differs between the test packages: the actor their
// changes are recorded under and their intervals, short so that a lease
// runs out within seconds and long enough for a loaded two-core machine
// under -race.
type Config struct {
	// Actor is recorded in the audit log for the env's applies and flips.
	Actor string

	// Lease, Beacon, Liveness and Poll are the broadcaster's
	// LeaseDuration, BeaconInterval, LivenessInterval and PollInterval.
	Lease, Beacon, Liveness, Poll time.Duration

	// Heartbeat and LeaseMargin are the agents' HeartbeatInterval and
	// LeaseMargin; InitialLease and Confirm their InitialLease and
	// ConfirmInterval, zero for the agent's defaults.
	Heartbeat, LeaseMargin, InitialLease, Confirm time.Duration

	// Wait bounds a start, and a wait for what normally takes
	// milliseconds.
	Wait time.Duration

	// StartAtOnce is how many agents StartAgents starts at a time; zero
	// starts them all at once.
	StartAtOnce int
}

// StopWait bounds stopping a broadcaster or an agent when a test ends.
const StopWait = 15 * time.Second

// Env is one test's world: a store in a schema of its own, an AMQP prefix
// of its own and an application schema ("@app" in SQL and manifests)
// holding the tables releases remove from.
type Env struct {
	T      *testing.T
	Ctx    context.Context
	Store  *schema.Store
	DB     *sqlx.DB
	Prefix string
	App    string // unquoted: testenv names are lower-case identifiers
	Table  string // App + ".instances", spelled as manifests and agents spell it
	Fleet  *fleet.Env
	Log    zerolog.Logger
	Config Config
}

// New sets up a test's world; testenv removes it when the test ends.
func New(t *testing.T, cfg Config) *Env {
	t.Helper()
	store := testenv.Store(t)
	e := &Env{T: t, Ctx: context.Background(), Store: store, DB: store.DB(), Prefix: testenv.Prefix(t), Log: testenv.Logger(), Config: cfg}
	e.App = testenv.Schema(t, store.DB(), "app")
	e.Table = e.App + ".instances"
	e.Fleet = &fleet.Env{Store: store, DatabaseURL: testenv.DatabaseURL(), AMQPURL: testenv.AMQPURL(), Prefix: e.Prefix, Logger: e.Log}
	return e
}

// UsePrefix moves the env's broadcasters, agents and commands to another
// exchange prefix, such as that of a vhost of the test's own.
func (e *Env) UsePrefix(prefix string) {
	e.Prefix = prefix
	e.Fleet.Prefix = prefix
}

// SQL replaces @app with the application schema and @store with the
// store's. Both are testenv names, lower-case identifiers: no quoting
// needed, and manifests spell them the same way.
func (e *Env) SQL(s string) string {
	return strings.NewReplacer("@app", e.App, "@store", e.Store.Schema()).Replace(s)
}

// Exec runs statements written with @app and @store.
func (e *Env) Exec(stmts ...string) {
	e.T.Helper()
	for _, s := range stmts {
		_, err := e.DB.ExecContext(e.Ctx, e.SQL(s))
		require.NoError(e.T, err, s)
	}
}

// CreateInstances creates @app.instances as a service built before
// release L knows it, with some rows.
func (e *Env) CreateInstances() {
	e.T.Helper()
	e.Exec(`CREATE TABLE @app.instances (id bigserial PRIMARY KEY, name text, display_name text, host text)`,
		`INSERT INTO @app.instances (name, display_name, host) SELECT 'vm-' || i, 'VM ' || i, 'compute-' || (i % 10) FROM generate_series(1, 200) AS i`)
}

// Manifest parses a manifest written with @app.
func (e *Env) Manifest(yaml string) *schema.Manifest {
	e.T.Helper()
	m, err := schema.ParseManifest("test.yaml", []byte(e.SQL(yaml)))
	require.NoError(e.T, err)
	return m
}

// Apply registers a release in expand.
func (e *Env) Apply(yaml string) {
	e.T.Helper()
	_, err := e.Store.ApplyRelease(e.Ctx, e.Manifest(yaml), e.Config.Actor)
	require.NoError(e.T, err)
}

// Flip moves a release without the contract checks and returns the epoch.
func (e *Env) Flip(release string, to phase.Phase) int64 {
	e.T.Helper()
	res, err := e.Store.Flip(e.Ctx, release, to, schema.FlipOptions{Actor: e.Config.Actor})
	require.NoError(e.T, err, "flip %s %s", release, to)
	return res.Epoch
}

// Phase is a release's phase in the store.
func (e *Env) Phase(release string) phase.Phase {
	e.T.Helper()
	rel, err := e.Store.Release(e.Ctx, release)
	require.NoError(e.T, err)
	return rel.Phase
}

// Columns lists the columns a table of the application schema has now.
func (e *Env) Columns(table string) []string {
	e.T.Helper()
	var cols []string
	require.NoError(e.T, e.DB.SelectContext(e.Ctx, &cols, `SELECT column_name FROM information_schema.columns
		WHERE table_schema = $1 AND table_name = $2 ORDER BY ordinal_position`, e.App, table))
	return cols
}

// OpenDB opens a pool of at most maxOpen connections to the test
// database, closed when the test ends; appName, when not empty, is its
// application_name.
func (e *Env) OpenDB(appName string, maxOpen int) *sql.DB {
	e.T.Helper()
	dsn := testenv.DatabaseURL()
	if appName != "" {
		var err error
		dsn, err = config.WithApplicationName(dsn, appName)
		require.NoError(e.T, err)
	}
	db, err := sql.Open("postgres", dsn)
	require.NoError(e.T, err)
	db.SetMaxOpenConns(maxOpen)
	e.T.Cleanup(func() { db.Close() })
	return db
}

// BroadcasterConfig is a broadcaster of the env with the test intervals.
func (e *Env) BroadcasterConfig() *broadcaster.Config {
	cfg := e.Fleet.BroadcasterConfig()
	c := e.Config
	cfg.LeaseDuration, cfg.BeaconInterval, cfg.LivenessInterval, cfg.PollInterval = c.Lease, c.Beacon, c.Liveness, c.Poll
	return cfg
}

// StartBroadcaster starts a broadcaster (waiting until it leads when lead
// is set), stopped when the test ends. mod, if not nil, adjusts its config.
func (e *Env) StartBroadcaster(lead bool, mod func(*broadcaster.Config)) *broadcaster.Broadcaster {
	e.T.Helper()
	cfg := e.BroadcasterConfig()
	if mod != nil {
		mod(cfg)
	}
	ctx, cancel := context.WithTimeout(e.Ctx, e.Config.Wait)
	defer cancel()
	b, err := e.Fleet.StartBroadcaster(ctx, cfg, false)
	require.NoError(e.T, err)
	e.T.Cleanup(func() { StopBroadcaster(e.T, b) })
	if lead {
		WaitFor(e.T, e.Config.Wait, "the broadcaster to lead", b.IsLeader)
	}
	return b
}

// StopBroadcaster stops a broadcaster within StopWait.
func StopBroadcaster(t testing.TB, b *broadcaster.Broadcaster) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), StopWait)
	defer cancel()
	require.NoError(t, b.Stop(ctx))
}

// AgentConfig is an agent of service with the test intervals that knows
// release L and queries @app.instances; db, when not nil, is its store
// connection.
func (e *Env) AgentConfig(service, id string, db *sql.DB) agent.Config {
	cfg := e.Fleet.AgentConfig()
	cfg.Service, cfg.ID, cfg.DB = service, id, db
	cfg.Releases = []string{"L"}
	cfg.Tables = map[string][]string{e.Table: novalike.Columns}
	e.agentIntervals(&cfg)
	cfg.Logger = e.Log.With().Str("component", "agent").Str("service", service).Str("id", id).Logger()
	return cfg
}

func (e *Env) agentIntervals(cfg *agent.Config) {
	c := e.Config
	cfg.HeartbeatInterval, cfg.LeaseMargin, cfg.InitialLease, cfg.ConfirmInterval = c.Heartbeat, c.LeaseMargin, c.InitialLease, c.Confirm
}

// StartAgent starts an agent, stopped when the test ends.
func (e *Env) StartAgent(cfg agent.Config) *agent.Agent {
	e.T.Helper()
	a, err := agent.New(cfg)
	require.NoError(e.T, err)
	ctx, cancel := context.WithTimeout(e.Ctx, e.Config.Wait)
	defer cancel()
	require.NoError(e.T, a.Start(ctx), "start agent %s", cfg.ID)
	e.T.Cleanup(func() { StopAgent(e.T, a) })
	return a
}

// StartAgents starts agents concurrently, Config.StartAtOnce at a time,
// each within twice Config.Wait; they are stopped concurrently when the
// test ends.
func (e *Env) StartAgents(cfgs []agent.Config) []*agent.Agent {
	e.T.Helper()
	agents := make([]*agent.Agent, len(cfgs))
	for i, cfg := range cfgs {
		a, err := agent.New(cfg)
		require.NoError(e.T, err, "agent %d", i)
		agents[i] = a
	}
	e.T.Cleanup(func() { stopAgents(e.T, agents) })
	atOnce := e.Config.StartAtOnce
	if atOnce <= 0 {
		atOnce = len(agents)
	}
	sem := make(chan struct{}, max(atOnce, 1))
	errs := make([]error, len(agents))
	var wg sync.WaitGroup
	for i, a := range agents {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			ctx, cancel := context.WithTimeout(e.Ctx, 2*e.Config.Wait)
			defer cancel()
			if err := a.Start(ctx); err != nil {
				errs[i] = fmt.Errorf("agent %d (%s): %w", i, a.ID(), err)
			}
		})
	}
	wg.Wait()
	require.NoError(e.T, errors.Join(errs...))
	return agents
}

// StopAgent stops an agent within StopWait.
func StopAgent(t testing.TB, a *agent.Agent) {
	t.Helper()
	require.NoError(t, stopAgent(a))
}

func stopAgent(a *agent.Agent) error {
	ctx, cancel := context.WithTimeout(context.Background(), StopWait)
	defer cancel()
	if err := a.Stop(ctx); err != nil {
		return fmt.Errorf("stop agent %s: %w", a.ID(), err)
	}
	return nil
}

// stopAgents stops agents concurrently, failing t (on its own goroutine)
// with every error.
func stopAgents(t testing.TB, agents []*agent.Agent) {
	t.Helper()
	errs := make([]error, len(agents))
	var wg sync.WaitGroup
	for i, a := range agents {
		wg.Go(func() { errs[i] = stopAgent(a) })
	}
	wg.Wait()
	require.NoError(t, errors.Join(errs...))
}

// IDs lists the agents' IDs.
func IDs(agents []*agent.Agent) []string {
	out := make([]string, len(agents))
	for i, a := range agents {
		out[i] = a.ID()
	}
	return out
}

// ServiceConfig configures a novalike instance of service with the test
// intervals.
func (e *Env) ServiceConfig(service string, workers int) novalike.Config {
	cfg := e.Fleet.ServiceConfig(service, e.Table, workers)
	e.agentIntervals(&cfg.Agent)
	return cfg
}

// AgentRow returns the store's row for an agent.
func (e *Env) AgentRow(id string) (schema.Agent, bool) {
	e.T.Helper()
	agents, err := e.Store.Agents(e.Ctx)
	require.NoError(e.T, err)
	for _, a := range agents {
		if a.ID == id {
			return a, true
		}
	}
	return schema.Agent{}, false
}

// StoreDrained reports whether the store holds, for every agent in ids, a
// status that drained epoch.
func (e *Env) StoreDrained(epoch int64, ids ...string) bool {
	e.T.Helper()
	distinct := slices.Compact(slices.Sorted(slices.Values(ids)))
	var n int
	require.NoError(e.T, e.DB.GetContext(e.Ctx, &n, e.SQL(`SELECT count(*) FROM @store.agents WHERE id = ANY($1) AND drained_epoch >= $2`), pq.StringArray(distinct), epoch))
	return n == len(distinct)
}

// WaitDrained waits until the store holds every agent's acknowledgement
// of epoch, and returns how long that took.
func (e *Env) WaitDrained(epoch int64, ids ...string) time.Duration {
	e.T.Helper()
	start := time.Now()
	WaitFor(e.T, e.Config.Wait, fmt.Sprintf("%d agents to acknowledge epoch %d in the store", len(ids), epoch), func() bool { return e.StoreDrained(epoch, ids...) })
	return time.Since(start)
}

// WaitFor polls cond every 5 ms until it holds, failing t after limit.
func WaitFor(t testing.TB, limit time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", limit, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// CLI runs the phasecast command in-process against the env's schema and
// prefix.
func (e *Env) CLI(args ...string) (code int, stdout, stderr string) {
	e.T.Helper()
	var out, errOut bytes.Buffer
	code = e.CLIWith(e.Ctx, &out, &errOut, args...)
	return code, out.String(), errOut.String()
}

// CLIWith runs the phasecast command in-process against the env's schema
// and prefix, until ctx ends, writing to stdout and stderr: a terminal's
// file, say.
func (e *Env) CLIWith(ctx context.Context, stdout, stderr io.Writer, args ...string) int {
	full := append([]string{"--database-url", testenv.DatabaseURL(), "--amqp-url", testenv.AMQPURL(),
		"--schema", e.Store.Schema(), "--exchange-prefix", e.Prefix, "--log-level", "warn"}, args...)
	return cli.Main(ctx, full, stdout, stderr)
}

// ReleaseL replaces name and display_name of @app.instances with
// common_name, as examples/manifests/L.yaml does.
const ReleaseL = `release: L
description: merge name and display_name into common_name
expand:
  - ALTER TABLE @app.instances ADD COLUMN IF NOT EXISTS common_name text
preconditions:
  - name: every instance has a common_name
    sql: SELECT 1 FROM @app.instances WHERE common_name IS NULL LIMIT 1
removed:
  - table: @app.instances
    columns: [name, display_name]
`

// ContractJSON is what 'phasecast contract --json' prints.
type ContractJSON struct {
	schema.ContractResult
	Error    string `json:"error"`
	ExitCode int    `json:"exit_code"`
}

// DecodeOne decodes exactly one JSON document from s.
func DecodeOne(t testing.TB, s string, v any) {
	t.Helper()
	dec := json.NewDecoder(strings.NewReader(s))
	require.NoError(t, dec.Decode(v), s)
	var extra json.RawMessage
	require.ErrorIs(t, dec.Decode(&extra), io.EOF, "more than one JSON document: %s", s)
}
