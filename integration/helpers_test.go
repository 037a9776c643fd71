package integration

import (
	"context"
	"database/sql"
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
	"github.com/phasecast/phasecast/cmd/phasecast/fleet"
	"github.com/phasecast/phasecast/examples/novalike"
	"github.com/phasecast/phasecast/integration/harness"
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

// e2eConfig is the harness's configuration for these tests.
var e2eConfig = harness.Config{
	Actor: "test",
	Lease: e2eLease, Beacon: e2eBeacon, Liveness: e2eLiveness, Poll: e2ePoll,
	Heartbeat: e2eHeartbeat, LeaseMargin: e2eMargin,
	Wait:        e2eWait,
	StartAtOnce: 10,
}

// e2eEnv is one test's world (harness.Env): a store in a schema of its
// own, an AMQP prefix of its own and an application schema ("@app" in SQL
// and manifests) holding the tables releases remove from.
type e2eEnv struct {
	h      *harness.Env
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
	agentDB     *sql.DB
}

func e2eSetup(t *testing.T) *e2eEnv {
	t.Helper()
	h := harness.New(t, e2eConfig)
	return &e2eEnv{h: h, t: t, ctx: h.Ctx, store: h.Store, db: h.DB, prefix: h.Prefix, app: h.App, table: h.Table, fleet: h.Fleet, log: h.Log}
}

// sql replaces @app with the application schema.
func (e *e2eEnv) sql(s string) string { return e.h.SQL(s) }

// exec runs statements in which @app is the application schema.
func (e *e2eEnv) exec(stmts ...string) {
	e.t.Helper()
	e.h.Exec(stmts...)
}

// createInstances creates @app.instances as a service built before
// release L knows it, with some rows.
func (e *e2eEnv) createInstances() {
	e.t.Helper()
	e.h.CreateInstances()
}

// e2eReleaseL replaces name and display_name of @app.instances with
// common_name, as examples/manifests/L.yaml does.
const e2eReleaseL = harness.ReleaseL

// manifest parses a manifest in which @app is the application schema.
func (e *e2eEnv) manifest(yaml string) *schema.Manifest {
	e.t.Helper()
	return e.h.Manifest(yaml)
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
	e.h.Apply(yaml)
}

// flip moves a release without the contract checks and returns the epoch.
func (e *e2eEnv) flip(release string, to phase.Phase) int64 {
	e.t.Helper()
	return e.h.Flip(release, to)
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
	return e.h.Phase(release)
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
	return e.h.Columns(table)
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
func (e *e2eEnv) broadcasterConfig() *broadcaster.Config { return e.h.BroadcasterConfig() }

// startBroadcaster starts a broadcaster (waiting until it leads when lead
// is set), stopped when the test ends. mod, if not nil, adjusts its config.
func (e *e2eEnv) startBroadcaster(lead bool, mod func(*broadcaster.Config)) *broadcaster.Broadcaster {
	e.t.Helper()
	return e.h.StartBroadcaster(lead, mod)
}

func e2eStopBroadcaster(t *testing.T, b *broadcaster.Broadcaster) {
	t.Helper()
	harness.StopBroadcaster(t, b)
}

// agentPool is one database handle the test's agents share, small enough
// that fifty agents stay far from the server's connection limit.
func (e *e2eEnv) agentPool() *sql.DB {
	e.agentDBOnce.Do(func() { e.agentDB = e.h.OpenDB("", 8) })
	return e.agentDB
}

// agentConfig configures an agent of service that knows release L and
// queries @app.instances, with a database connection when withDB is set.
func (e *e2eEnv) agentConfig(service string, withDB bool) agent.Config {
	var db *sql.DB
	if withDB {
		db = e.agentPool()
	}
	return e.h.AgentConfig(service, agent.NewID(service), db)
}

// startAgent starts an agent, stopped when the test ends.
func (e *e2eEnv) startAgent(cfg agent.Config) *agent.Agent {
	e.t.Helper()
	return e.h.StartAgent(cfg)
}

// startAgents starts n agents, a few at a time.
func (e *e2eEnv) startAgents(n int, configure func(i int) agent.Config) []*agent.Agent {
	e.t.Helper()
	cfgs := make([]agent.Config, n)
	for i := range n {
		cfgs[i] = configure(i)
	}
	return e.h.StartAgents(cfgs)
}

func e2eStopAgent(t *testing.T, a *agent.Agent) {
	t.Helper()
	harness.StopAgent(t, a)
}

// serviceConfig configures a novalike instance with the e2e intervals.
func (e *e2eEnv) serviceConfig(service string, workers int) novalike.Config {
	return e.h.ServiceConfig(service, workers)
}

// agentRow returns the store's row for an agent.
func (e *e2eEnv) agentRow(id string) (schema.Agent, bool) {
	e.t.Helper()
	return e.h.AgentRow(id)
}

// storeDrained reports whether the store holds, for every agent, a drained
// epoch of at least epoch.
func (e *e2eEnv) storeDrained(epoch int64, agents ...*agent.Agent) bool {
	e.t.Helper()
	return e.h.StoreDrained(epoch, harness.IDs(agents)...)
}

// waitDrained waits until the store holds every agent's acknowledgement
// of epoch.
func (e *e2eEnv) waitDrained(epoch int64, agents ...*agent.Agent) {
	e.t.Helper()
	e.h.WaitDrained(epoch, harness.IDs(agents)...)
}

// cli runs the phasecast command in-process against the test's schema and
// prefix.
func (e *e2eEnv) cli(args ...string) (code int, stdout, stderr string) {
	e.t.Helper()
	return e.h.CLI(args...)
}

// e2eWaitFor polls cond until it holds, failing the test after limit.
func e2eWaitFor(t *testing.T, limit time.Duration, what string, cond func() bool) {
	t.Helper()
	harness.WaitFor(t, limit, what, cond)
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
