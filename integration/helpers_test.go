package integration

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/agent"
	"github.com/phasecast/phasecast/broadcaster"
	"github.com/phasecast/phasecast/cmd/phasecast/cli"
	"github.com/phasecast/phasecast/cmd/phasecast/fleet"
	"github.com/phasecast/phasecast/examples/novalike"
	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/schema"
)

// Intervals short enough that the whole package runs in well under a
// minute and a half, long enough for a loaded two-core machine under -race.
const (
	e2eLease     = 3 * time.Second
	e2eBeacon    = 400 * time.Millisecond
	e2eLiveness  = 200 * time.Millisecond
	e2ePoll      = 200 * time.Millisecond
	e2eHeartbeat = 300 * time.Millisecond
	e2eMargin    = 300 * time.Millisecond
	// e2eWait bounds a wait for something that normally takes milliseconds.
	e2eWait = 15 * time.Second
)

// e2eEnv is one test's world: a store in a schema of its own, an AMQP
// prefix of its own and an application schema ("@app" in SQL and
// manifests) holding the tables releases remove from.
type e2eEnv struct {
	t      *testing.T
	ctx    context.Context
	store  *schema.Store
	db     *sqlx.DB
	prefix string
	app    string // unquoted; testenv names are lower-case identifiers
	table  string // app + ".instances", spelled as manifests and agents spell it
	fleet  *fleet.Env
	log    zerolog.Logger

	agentDBOnce sync.Once
	agentDB     *sqlx.DB
}

func e2eSetup(t *testing.T) *e2eEnv {
	t.Helper()
	store := testenv.Store(t)
	prefix := testenv.Prefix(t)
	e := &e2eEnv{t: t, ctx: context.Background(), store: store, db: store.DB(), prefix: prefix, app: testenv.Schema(t, store.DB(), "app"), log: testenv.Logger()}
	e.table = e.app + ".instances"
	e.fleet = &fleet.Env{Store: store, DatabaseURL: testenv.DatabaseURL(), AMQPURL: testenv.AMQPURL(), Prefix: prefix, Logger: e.log}
	return e
}

// sql replaces @app with the application schema.
func (e *e2eEnv) sql(s string) string { return strings.ReplaceAll(s, "@app", e.app) }

// exec runs statements in which @app is the application schema.
func (e *e2eEnv) exec(stmts ...string) {
	e.t.Helper()
	for _, s := range stmts {
		_, err := e.db.ExecContext(e.ctx, e.sql(s))
		require.NoError(e.t, err, s)
	}
}

// createInstances creates @app.instances as a service built before
// release L knows it, with some rows.
func (e *e2eEnv) createInstances() {
	e.t.Helper()
	e.exec(`CREATE TABLE @app.instances (id bigserial PRIMARY KEY, name text, display_name text, host text)`,
		`INSERT INTO @app.instances (name, display_name, host) SELECT 'vm-' || i, 'VM ' || i, 'compute-' || (i % 10) FROM generate_series(1, 200) AS i`)
}

// e2eReleaseL replaces name and display_name of @app.instances with
// common_name, as examples/manifests/L.yaml does.
const e2eReleaseL = `release: L
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

// manifest parses a manifest in which @app is the application schema.
func (e *e2eEnv) manifest(yaml string) *schema.Manifest {
	e.t.Helper()
	m, err := schema.ParseManifest("test.yaml", []byte(e.sql(yaml)))
	require.NoError(e.t, err)
	return m
}

// manifestFile writes a manifest for the CLI and returns its path.
func (e *e2eEnv) manifestFile(yaml string) string {
	e.t.Helper()
	path := filepath.Join(e.t.TempDir(), "release.yaml")
	require.NoError(e.t, os.WriteFile(path, []byte(e.sql(yaml)), 0o600))
	return path
}

// apply registers a release in expand.
func (e *e2eEnv) apply(yaml string) {
	e.t.Helper()
	_, err := e.store.ApplyRelease(e.ctx, e.manifest(yaml), "test")
	require.NoError(e.t, err)
}

// flip moves a release without the contract checks and returns the epoch.
func (e *e2eEnv) flip(release string, to phase.Phase) int64 {
	e.t.Helper()
	res, err := e.store.Flip(e.ctx, release, to, schema.FlipOptions{Actor: "test"})
	require.NoError(e.t, err)
	return res.Epoch
}

// flipChecked moves a release to contract with the checks 'phasecast flip'
// runs, and returns the epoch.
func (e *e2eEnv) flipChecked(release string) int64 {
	e.t.Helper()
	res, err := e.store.Flip(e.ctx, release, phase.Contract, schema.FlipOptions{Actor: "test", Check: e.store.ContractCheck(schema.ContractCheckOptions{})})
	require.NoError(e.t, err)
	return res.Epoch
}

// backfill is release L's data migration.
func (e *e2eEnv) backfill() {
	e.t.Helper()
	e.exec(`UPDATE @app.instances SET common_name = coalesce(name, display_name) WHERE common_name IS NULL`)
}

// toMigrate takes release L (already applied) to migrate and backfills.
func (e *e2eEnv) toMigrate() int64 {
	e.t.Helper()
	epoch := e.flip("L", phase.Migrate)
	e.backfill()
	return epoch
}

func (e *e2eEnv) phase(release string) phase.Phase {
	e.t.Helper()
	rel, err := e.store.Release(e.ctx, release)
	require.NoError(e.t, err)
	return rel.Phase
}

func (e *e2eEnv) epoch() int64 {
	e.t.Helper()
	epoch, err := e.store.Epoch(e.ctx)
	require.NoError(e.t, err)
	return epoch
}

// columns lists the columns of a table of the application schema.
func (e *e2eEnv) columns(table string) []string {
	e.t.Helper()
	var cols []string
	require.NoError(e.t, e.db.SelectContext(e.ctx, &cols, `SELECT column_name FROM information_schema.columns
		WHERE table_schema = $1 AND table_name = $2 ORDER BY ordinal_position`, e.app, table))
	return cols
}

// storeRows captures every row of the store's own tables that a change
// would touch, to show that something changed nothing.
func (e *e2eEnv) storeRows() string {
	e.t.Helper()
	var rows []string
	for _, table := range []string{"epoch", "releases", "removals", "events", "audit"} {
		var r []string
		require.NoError(e.t, e.db.SelectContext(e.ctx, &r, fmt.Sprintf(`SELECT t::text FROM %q.%q t ORDER BY 1`, e.store.Schema(), table)))
		rows = append(rows, r...)
	}
	return strings.Join(rows, "\n")
}

// broadcasterConfig has the short e2e intervals.
func (e *e2eEnv) broadcasterConfig() *broadcaster.Config {
	cfg := e.fleet.BroadcasterConfig()
	cfg.LeaseDuration, cfg.BeaconInterval, cfg.LivenessInterval, cfg.PollInterval = e2eLease, e2eBeacon, e2eLiveness, e2ePoll
	return cfg
}

// startBroadcaster starts a broadcaster (waiting until it leads when lead
// is set), stopped when the test ends. mod, if not nil, adjusts its config.
func (e *e2eEnv) startBroadcaster(lead bool, mod func(*broadcaster.Config)) *broadcaster.Broadcaster {
	e.t.Helper()
	cfg := e.broadcasterConfig()
	if mod != nil {
		mod(cfg)
	}
	ctx, cancel := context.WithTimeout(e.ctx, e2eWait)
	defer cancel()
	b, err := e.fleet.StartBroadcaster(ctx, cfg, lead)
	require.NoError(e.t, err)
	e.t.Cleanup(func() { e2eStopBroadcaster(e.t, b) })
	return b
}

func e2eStopBroadcaster(t *testing.T, b *broadcaster.Broadcaster) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), e2eWait)
	defer cancel()
	require.NoError(t, b.Stop(ctx))
}

// agentPool is one database handle the test's agents share, small enough
// that fifty agents stay far from the server's connection limit.
func (e *e2eEnv) agentPool() *sqlx.DB {
	e.agentDBOnce.Do(func() {
		db, err := sqlx.Open("postgres", testenv.DatabaseURL())
		require.NoError(e.t, err)
		db.SetMaxOpenConns(8)
		e.t.Cleanup(func() { db.Close() })
		e.agentDB = db
	})
	return e.agentDB
}

// agentConfig configures an agent of service that knows release L and
// queries @app.instances, with a database connection when withDB is set.
func (e *e2eEnv) agentConfig(service string, withDB bool) agent.Config {
	cfg := e.fleet.AgentConfig()
	cfg.Service = service
	cfg.ID = agent.NewID(service)
	cfg.Releases = []string{"L"}
	cfg.Tables = map[string][]string{e.table: novalike.Columns}
	cfg.HeartbeatInterval, cfg.LeaseMargin = e2eHeartbeat, e2eMargin
	cfg.Logger = e.log.With().Str("component", "agent").Str("service", service).Logger()
	if withDB {
		cfg.DB = e.agentPool().DB
	}
	return cfg
}

// startAgent starts an agent, stopped when the test ends.
func (e *e2eEnv) startAgent(cfg agent.Config) *agent.Agent {
	e.t.Helper()
	a, err := agent.New(cfg)
	require.NoError(e.t, err)
	ctx, cancel := context.WithTimeout(e.ctx, e2eWait)
	defer cancel()
	require.NoError(e.t, a.Start(ctx))
	e.t.Cleanup(func() { e2eStopAgent(e.t, a) })
	return a
}

// startAgents starts n agents, a few at a time.
func (e *e2eEnv) startAgents(n int, configure func(i int) agent.Config) []*agent.Agent {
	e.t.Helper()
	agents := make([]*agent.Agent, n)
	errs := make([]error, n)
	sem := make(chan struct{}, 10)
	var wg sync.WaitGroup
	for i := range n {
		a, err := agent.New(configure(i))
		require.NoError(e.t, err)
		agents[i] = a
		e.t.Cleanup(func() { e2eStopAgent(e.t, a) })
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			ctx, cancel := context.WithTimeout(e.ctx, 30*time.Second)
			defer cancel()
			errs[i] = a.Start(ctx)
		})
	}
	wg.Wait()
	for i, err := range errs {
		require.NoError(e.t, err, "agent %d", i)
	}
	return agents
}

func e2eStopAgent(t *testing.T, a *agent.Agent) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), e2eWait)
	defer cancel()
	require.NoError(t, a.Stop(ctx))
}

// serviceConfig configures a novalike instance with the e2e intervals.
func (e *e2eEnv) serviceConfig(service string, workers int) novalike.Config {
	cfg := e.fleet.ServiceConfig(service, e.table, workers)
	cfg.Agent.HeartbeatInterval, cfg.Agent.LeaseMargin = e2eHeartbeat, e2eMargin
	return cfg
}

// agentRow returns the store's row for an agent.
func (e *e2eEnv) agentRow(id string) (schema.Agent, bool) {
	e.t.Helper()
	agents, err := e.store.Agents(e.ctx)
	require.NoError(e.t, err)
	for _, a := range agents {
		if a.ID == id {
			return a, true
		}
	}
	return schema.Agent{}, false
}

// storeDrained reports whether the store holds, for every agent, a drained
// epoch of at least epoch.
func (e *e2eEnv) storeDrained(epoch int64, agents ...*agent.Agent) bool {
	e.t.Helper()
	rows, err := e.store.Agents(e.ctx)
	require.NoError(e.t, err)
	drained := make(map[string]int64, len(rows))
	for _, r := range rows {
		drained[r.ID] = r.DrainedEpoch
	}
	for _, a := range agents {
		if d, ok := drained[a.ID()]; !ok || d < epoch {
			return false
		}
	}
	return true
}

// waitDrained waits until the store holds every agent's acknowledgement
// of epoch.
func (e *e2eEnv) waitDrained(epoch int64, agents ...*agent.Agent) {
	e.t.Helper()
	e2eWaitFor(e.t, e2eWait, fmt.Sprintf("%d agents to acknowledge epoch %d in the store", len(agents), epoch), func() bool {
		return e.storeDrained(epoch, agents...)
	})
}

// cli runs the phasecast command in-process against the test's schema and
// prefix.
func (e *e2eEnv) cli(args ...string) (code int, stdout, stderr string) {
	e.t.Helper()
	var out, errOut bytes.Buffer
	full := append([]string{"--database-url", testenv.DatabaseURL(), "--amqp-url", testenv.AMQPURL(),
		"--schema", e.store.Schema(), "--exchange-prefix", e.prefix, "--log-level", "warn"}, args...)
	code = cli.Main(e.ctx, full, &out, &errOut)
	return code, out.String(), errOut.String()
}

// e2eWaitFor polls cond until it holds, failing the test after limit.
func e2eWaitFor(t *testing.T, limit time.Duration, what string, cond func() bool) {
	t.Helper()
	require.NoError(t, fleet.WaitFor(context.Background(), limit, cond), "waiting for %s", what)
}

// e2eHeavyLock is a PostgreSQL advisory lock that tests holding many
// database connections at once take for their duration, across test
// processes: go test runs packages in parallel, and the default
// max_connections (100) has room for one such test at a time. The demo's
// test (internal/demo) takes the same lock.
const e2eHeavyLock = "phasecast-tests:connection-heavy"

// e2eHeavy waits for the heavy-test lock, holds it until the test ends,
// and then waits (a while, not forever) until the server has conns
// connections free.
func e2eHeavy(t *testing.T, conns int) {
	t.Helper()
	db := testenv.DB(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	conn, err := db.Connx(ctx)
	require.NoError(t, err)
	_, err = conn.ExecContext(ctx, `SELECT pg_advisory_lock(hashtext($1))`, e2eHeavyLock)
	require.NoError(t, err, "waiting for the other connection-heavy test to finish")
	t.Cleanup(func() {
		_, _ = conn.ExecContext(context.Background(), `SELECT pg_advisory_unlock(hashtext($1))`, e2eHeavyLock)
		_ = conn.Close()
	})
	free := func() int {
		var n int
		require.NoError(t, conn.GetContext(ctx, &n, `SELECT current_setting('max_connections')::int - count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'`))
		return n
	}
	if err := fleet.WaitFor(ctx, 30*time.Second, func() bool { return free() >= conns }); err != nil {
		t.Logf("PostgreSQL has %d connections free and this test needs about %d: running anyway", free(), conns)
	}
}
