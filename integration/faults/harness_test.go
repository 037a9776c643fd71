package faults

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/agent"
	"github.com/phasecast/phasecast/broadcaster"
	"github.com/phasecast/phasecast/examples/novalike"
	"github.com/phasecast/phasecast/integration/harness"
	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/retry"
	"github.com/phasecast/phasecast/schema"
)

// Intervals: short, so that a lease runs out within seconds, and long
// enough for a loaded two-core machine under -race.
const (
	lease       = 3 * time.Second
	leaseMargin = 500 * time.Millisecond
	heartbeat   = 500 * time.Millisecond
	beacon      = time.Second
	liveness    = 250 * time.Millisecond
	outboxPoll  = 250 * time.Millisecond
	confirmIvl  = 50 * time.Millisecond
	// wait bounds a wait for what normally takes milliseconds.
	wait = 20 * time.Second
)

// releaseL replaces name and display_name of @app.instances with
// common_name and drops the table @app.legacy_flavors: two removals, so a
// runner stopped between them leaves work half done for a re-run.
const releaseL = `release: L
description: merge name and display_name into common_name
expand:
  - ALTER TABLE @app.instances ADD COLUMN IF NOT EXISTS common_name text
removed:
  - table: @app.instances
    columns: [name, display_name]
  - table: @app.legacy_flavors
`

// modelColumns is every column the services' model knows.
var modelColumns = novalike.Columns

// faultsConfig is the harness's configuration for these tests.
var faultsConfig = harness.Config{
	Actor: "faults",
	Lease: lease, Beacon: beacon, Liveness: liveness, Poll: outboxPoll,
	Heartbeat: heartbeat, LeaseMargin: leaseMargin, InitialLease: lease, Confirm: confirmIvl,
	Wait: wait,
}

// env is one test's world (harness.Env): a store in a schema of its own,
// an AMQP prefix of its own, an application schema ("@app") with the
// tables release L changes, and an audit of every status the store
// records.
type env struct {
	h      *harness.Env
	t      *testing.T
	ctx    context.Context
	store  *schema.Store
	db     *sqlx.DB
	prefix string
	app    string
	table  string // app + ".instances", as manifests and agents spell it
	log    zerolog.Logger
}

func setup(t *testing.T) *env {
	t.Helper()
	h := harness.New(t, faultsConfig)
	// A bounded pool that keeps its sessions: the server's connection
	// limit is shared with every other package's tests.
	h.DB.SetMaxOpenConns(8)
	h.DB.SetMaxIdleConns(4)
	e := &env{h: h, t: t, ctx: h.Ctx, store: h.Store, db: h.DB, prefix: h.Prefix, app: h.App, table: h.Table, log: h.Log}
	h.CreateInstances()
	e.exec(`CREATE TABLE @app.legacy_flavors (id int PRIMARY KEY, flavor text)`)
	e.installStatusLog()
	h.Apply(releaseL)
	return e
}

// usePrefix moves the env's broadcasters and agents to another exchange
// prefix, such as that of a vhost of the test's own.
func (e *env) usePrefix(prefix string) {
	e.prefix = prefix
	e.h.UsePrefix(prefix)
}

// sql replaces @app with the application schema and @store with the
// store's.
func (e *env) sql(s string) string { return e.h.SQL(s) }

func (e *env) exec(stmts ...string) {
	e.t.Helper()
	e.h.Exec(stmts...)
}

// installStatusLog records every write of the agents table with the
// database's clock at the moment of the write: when each acknowledgement
// reached the store, every lease granted, and the order of each agent's
// recorded epochs. It is test instrumentation only.
func (e *env) installStatusLog() {
	e.exec(`CREATE TABLE @store.status_log (
			id bigserial PRIMARY KEY, agent_id text NOT NULL, seq bigint NOT NULL,
			applied_epoch bigint NOT NULL, drained_epoch bigint NOT NULL,
			lease_expires_at timestamptz NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())`,
		`CREATE FUNCTION @store.log_status() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN
			INSERT INTO @store.status_log (agent_id, seq, applied_epoch, drained_epoch, lease_expires_at)
			VALUES (NEW.id, NEW.seq, NEW.applied_epoch, NEW.drained_epoch, NEW.lease_expires_at);
			RETURN NEW;
		END $$`,
		`CREATE TRIGGER log_status AFTER INSERT OR UPDATE ON @store.agents FOR EACH ROW EXECUTE FUNCTION @store.log_status()`)
}

// ackTimes returns, for each agent, when the store first recorded a status
// of it that drained epoch (database clock).
func (e *env) ackTimes(epoch int64) map[string]time.Time {
	e.t.Helper()
	var rows []struct {
		ID string    `db:"agent_id"`
		At time.Time `db:"at"`
	}
	require.NoError(e.t, e.db.SelectContext(e.ctx, &rows, e.sql(`SELECT agent_id, min(at) AS at FROM @store.status_log WHERE drained_epoch >= $1 GROUP BY agent_id`), epoch))
	out := make(map[string]time.Time, len(rows))
	for _, r := range rows {
		out[r.ID] = r.At
	}
	return out
}

// lastLease returns the lease the store last granted an agent (database
// clock).
func (e *env) lastLease(id string) time.Time {
	e.t.Helper()
	var at time.Time
	require.NoError(e.t, e.db.GetContext(e.ctx, &at, e.sql(`SELECT lease_expires_at FROM @store.agents WHERE id = $1`), id))
	return at
}

// phaseAt returns when release L entered phase p (database clock), from
// the audit log: for contracting, the moment the runner decided every live
// agent had acknowledged, which precedes its DDL.
func (e *env) phaseAt(p phase.Phase) (time.Time, int) {
	e.t.Helper()
	var rows []time.Time
	require.NoError(e.t, e.db.SelectContext(e.ctx, &rows, e.sql(`SELECT at FROM @store.audit WHERE release = 'L' AND to_phase = $1 ORDER BY id`), string(p)))
	if len(rows) == 0 {
		return time.Time{}, 0
	}
	return rows[len(rows)-1], len(rows)
}

func (e *env) phase() phase.Phase {
	e.t.Helper()
	return e.h.Phase("L")
}

func (e *env) flip(to phase.Phase) int64 {
	e.t.Helper()
	return e.h.Flip("L", to)
}

// columns returns the columns @app.instances has now.
func (e *env) columns() []string {
	e.t.Helper()
	return e.h.Columns("instances")
}

func (e *env) tableExists(name string) bool {
	e.t.Helper()
	var ok bool
	require.NoError(e.t, e.db.GetContext(e.ctx, &ok, `SELECT to_regclass($1) IS NOT NULL`, pq.QuoteIdentifier(e.app)+"."+pq.QuoteIdentifier(name)))
	return ok
}

// broadcasterConfig is a broadcaster of this env with the test intervals.
func (e *env) broadcasterConfig() *broadcaster.Config { return e.h.BroadcasterConfig() }

// startBroadcaster starts a broadcaster, waits until it leads, and stops
// it when the test ends.
func (e *env) startBroadcaster(mod func(*broadcaster.Config)) *broadcaster.Broadcaster {
	e.t.Helper()
	return e.h.StartBroadcaster(true, mod)
}

func stopBroadcaster(t *testing.T, b *broadcaster.Broadcaster) {
	t.Helper()
	harness.StopBroadcaster(t, b)
}

// agentConfig is an agent of this env with the test intervals; db, when
// not nil, is the agent's store connection.
func (e *env) agentConfig(id string, db *sql.DB) agent.Config {
	cfg := e.h.AgentConfig("svc-"+strings.SplitN(id, "-", 2)[0], id, db)
	cfg.Version = "1.0"
	return cfg
}

// agentDB is a pool for agents' store connections, closed when the test
// ends.
func (e *env) agentDB(maxOpen int) *sql.DB {
	e.t.Helper()
	return e.h.OpenDB("", maxOpen)
}

// startAgent starts an agent and stops it when the test ends.
func (e *env) startAgent(cfg agent.Config) *agent.Agent {
	e.t.Helper()
	return e.h.StartAgent(cfg)
}

// startAgents starts agents concurrently.
func (e *env) startAgents(cfgs []agent.Config) []*agent.Agent {
	e.t.Helper()
	return e.h.StartAgents(cfgs)
}

func stopAgent(t *testing.T, a *agent.Agent) {
	t.Helper()
	harness.StopAgent(t, a)
}

// storeDrained reports whether the store holds, for every agent, a status
// that drained epoch.
func (e *env) storeDrained(epoch int64, ids ...string) bool {
	e.t.Helper()
	return e.h.StoreDrained(epoch, ids...)
}

func (e *env) waitDrained(epoch int64, ids ...string) time.Duration {
	e.t.Helper()
	return e.h.WaitDrained(epoch, ids...)
}

func ids(agents []*agent.Agent) []string { return harness.IDs(agents) }

// contract runs the contract runner on release L with test settings.
func (e *env) contract(ctx context.Context, store *schema.Store, mod func(*schema.ContractOptions)) (*schema.ContractResult, error) {
	opts := schema.ContractOptions{
		Timeout: time.Minute, PollInterval: 20 * time.Millisecond, LeaderWithin: 10 * time.Second,
		LockTimeout: 200 * time.Millisecond, Actor: "faults",
		Log: e.log.With().Str("component", "runner").Logger(),
	}
	if mod != nil {
		mod(&opts)
	}
	return store.Contract(ctx, "L", opts)
}

// runnerAsync starts the contract runner in the background.
func (e *env) runnerAsync(mod func(*schema.ContractOptions)) <-chan runnerResult {
	out := make(chan runnerResult, 1)
	go func() {
		res, err := e.contract(e.ctx, e.store, mod)
		out <- runnerResult{res, err, time.Now()}
	}()
	return out
}

type runnerResult struct {
	res  *schema.ContractResult
	err  error
	done time.Time
}

func awaitRunner(t *testing.T, ch <-chan runnerResult, limit time.Duration) runnerResult {
	t.Helper()
	select {
	case r := <-ch:
		return r
	case <-time.After(limit):
		t.Fatalf("the contract runner did not finish within %s", limit)
		return runnerResult{}
	}
}

// requireDroppedAfterAcks is the invariant's bookkeeping: the runner
// completed, every agent in mustAck acknowledged the contract epoch in the
// store before the runner decided to drop (both on the database clock),
// and before the DDL began (runner's clock), and the columns are gone.
func (e *env) requireDroppedAfterAcks(r runnerResult, mustAck []string) (lastAck time.Time) {
	e.t.Helper()
	require.NoError(e.t, r.err)
	require.Equal(e.t, schema.OutcomeComplete, r.res.Outcome)
	decided, n := e.phaseAt(phase.Contracting)
	require.Equal(e.t, 1, n, "the release entered contracting once")
	acks := e.ackTimes(r.res.ContractEpoch)
	for _, id := range mustAck {
		at, ok := acks[id]
		require.True(e.t, ok, "agent %s never acknowledged epoch %d in the store: acknowledgement lost", id, r.res.ContractEpoch)
		require.True(e.t, at.Before(decided), "agent %s acknowledged at %s, after the runner decided at %s", id, at, decided)
		require.False(e.t, r.res.DDLStart.Round(0).Before(at), "agent %s acknowledged at %s, after the DDL began at %s", id, at, r.res.DDLStart)
		if at.After(lastAck) {
			lastAck = at
		}
	}
	require.NotContains(e.t, e.columns(), "name")
	require.NotContains(e.t, e.columns(), "display_name")
	require.False(e.t, e.tableExists("legacy_flavors"))
	return lastAck
}

// traffic is a service's work on @app.instances: each unit of work enters
// the agent, builds its query from the pinned snapshot, runs it and exits.
// A query that fails (a dropped column it named) is the invariant broken.
type traffic struct {
	queries, failed, refused atomic.Int64
	mu                       sync.Mutex
	failures                 []error
	cancel                   context.CancelFunc
	wg                       sync.WaitGroup
}

// runTraffic starts workers on a, querying through db, until the test
// ends or stop is called.
func (e *env) runTraffic(a *agent.Agent, db *sql.DB, workers int) *traffic {
	ctx, cancel := context.WithCancel(e.ctx)
	tr := &traffic{cancel: cancel}
	table := a.Table(e.table)
	quoted := schema.QuoteTable(e.table)
	for range workers {
		tr.wg.Go(func() {
			for ctx.Err() == nil {
				g, err := a.Enter()
				if err != nil {
					if !errors.Is(err, agent.ErrStale) {
						tr.fail(err)
					}
					tr.refused.Add(1)
					_ = retry.Sleep(ctx, 10*time.Millisecond)
					continue
				}
				snap := g.Snapshot()
				cols := snap.Columns(table)
				var names, marks []string
				var args []any
				for _, c := range cols {
					if c == "id" {
						continue
					}
					names = append(names, pq.QuoteIdentifier(c))
					args = append(args, "x")
					marks = append(marks, fmt.Sprintf("$%d", len(args)))
				}
				_, err = db.ExecContext(ctx, `INSERT INTO `+quoted+` (`+strings.Join(names, ", ")+`) VALUES (`+strings.Join(marks, ", ")+`)`, args...)
				if err == nil {
					var rows *sql.Rows
					rows, err = db.QueryContext(ctx, `SELECT `+snap.SelectList(table)+` FROM `+quoted+` ORDER BY id DESC LIMIT 3`)
					if err == nil {
						for rows.Next() {
						}
						err = errors.Join(rows.Err(), rows.Close())
					}
				}
				g.Exit()
				switch {
				case err == nil:
					tr.queries.Add(1)
				case ctx.Err() == nil:
					tr.fail(err)
				}
				_ = retry.Sleep(ctx, 5*time.Millisecond)
			}
		})
	}
	e.t.Cleanup(tr.stop)
	return tr
}

func (tr *traffic) fail(err error) {
	tr.failed.Add(1)
	tr.mu.Lock()
	if len(tr.failures) < 5 {
		tr.failures = append(tr.failures, err)
	}
	tr.mu.Unlock()
}

func (tr *traffic) stop() {
	tr.cancel()
	tr.wg.Wait()
}

// totals stops every traffic and sums it.
func totals(trs ...*traffic) (queries, failed, refused int64, failures []error) {
	for _, tr := range trs {
		tr.stop()
		queries += tr.queries.Load()
		failed += tr.failed.Load()
		refused += tr.refused.Load()
		tr.mu.Lock()
		failures = append(failures, tr.failures...)
		tr.mu.Unlock()
	}
	return
}

// requireTraffic stops every traffic and requires that queries ran and
// none failed; it returns the totals for the figures.
func requireTraffic(t *testing.T, trs ...*traffic) (queries, failed, refused int64) {
	t.Helper()
	queries, failed, refused, failures := totals(trs...)
	require.Zero(t, failed, "queries failed: %v", failures)
	require.Positive(t, queries)
	return queries, failed, refused
}

// serviceDB opens a database for services' queries, with an
// application_name the runner does not count against anyone.
func (e *env) serviceDB(appName string, maxOpen int) *sql.DB {
	e.t.Helper()
	db := e.h.OpenDB(appName, maxOpen)
	db.SetMaxIdleConns(maxOpen)
	return db
}

// waitFor polls cond every 5 ms until it holds, failing t after limit.
func waitFor(t *testing.T, limit time.Duration, what string, cond func() bool) {
	t.Helper()
	harness.WaitFor(t, limit, what, cond)
}

// figure logs one measured figure in a form docs/RELIABILITY.md is
// compiled from: "FIGURE <test> <name>=<value>".
func figure(t *testing.T, name string, value any) {
	t.Helper()
	if d, ok := value.(time.Duration); ok {
		value = fmt.Sprintf("%.0fms", float64(d.Microseconds())/1000)
	}
	t.Logf("FIGURE %s %s=%v", t.Name(), name, value)
}

// median of durations.
func median(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}
