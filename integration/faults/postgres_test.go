package faults

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/broadcaster"
	"github.com/phasecast/phasecast/internal/config"
	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/schema"
)

// openStore opens a store handle of its own whose sessions carry appName,
// so that a test can terminate exactly them. It returns the handle and its
// connection string.
func (e *env) openStore(appName string) (*schema.Store, string) {
	e.t.Helper()
	dsn, err := config.WithApplicationName(testenv.DatabaseURL(), appName)
	require.NoError(e.t, err)
	s, err := schema.Open(e.ctx, dsn, e.store.Schema())
	require.NoError(e.t, err)
	e.t.Cleanup(func() { s.Close() })
	return s, dsn
}

// terminate ends every session with appName (pg_terminate_backend) and
// returns how many there were.
func (e *env) terminate(appName string) int {
	e.t.Helper()
	var n int
	require.NoError(e.t, e.db.GetContext(e.ctx, &n, `SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1 AND pid <> pg_backend_pid()`, appName))
	return n
}

// TestPostgresTerminatedUnderBroadcaster: every database session of the
// broadcaster (its pool, the connection holding the leader lock, the
// LISTEN connection) is terminated just before a flip to contract commits,
// and three times more while the runner runs; the runner starts while the
// broadcaster, having lost its lock session, does not lead. The
// broadcaster retakes the lead, publishes the flip, records the acks, and
// the runner (which waits for the broadcaster to lead again rather than
// refuse) drops after the last of them. No query fails.
func TestPostgresTerminatedUnderBroadcaster(t *testing.T) {
	t.Parallel()
	e := setup(t)
	app := testenv.Name("faults_bc")
	bstore, dsn := e.openStore(app)
	b := e.startBroadcaster(func(c *broadcaster.Config) { c.Store, c.DatabaseURL = bstore, dsn })
	agents, trs := e.fleetOf("pgbc", testenv.AMQPURL(), nil)
	e.waitDrained(e.flip(phase.Migrate), ids(agents)...)
	recordedBefore := b.Stats().StatusesRecorded

	leaderless := watchLeadership(t, b)
	terminated := e.terminate(app)
	require.GreaterOrEqual(t, terminated, 2, "the lock and LISTEN sessions at least")
	first := time.Now()
	epoch := e.flip(phase.Contract)
	// The runner starts while no broadcaster leads: the only one lost its
	// lock session and stands by before it takes the lock again.
	waitFor(t, wait, "the broadcaster to stand down", func() bool {
		row, ok := e.broadcasterRow(b.ID())
		return ok && !row.Leader && !b.IsLeader()
	})
	runner := e.runnerAsync(nil)
	for range 3 {
		time.Sleep(300 * time.Millisecond)
		terminated += e.terminate(app)
	}
	r := awaitRunner(t, runner, 2*wait)
	lastAck := e.requireDroppedAfterAcks(r, ids(agents))
	waitFor(t, wait, "the broadcaster to lead again", b.IsLeader)
	without := leaderless()
	st := b.Stats()
	require.GreaterOrEqual(t, st.Takeovers, int64(2), "the broadcaster lost the lead with its lock session and took it back")
	require.Greater(t, st.StatusesRecorded, recordedBefore)
	time.Sleep(300 * time.Millisecond)
	queries, failed, refused := requireTraffic(t, trs...)
	for _, a := range agents {
		require.GreaterOrEqual(t, a.Stats().DrainedEpoch, epoch)
	}
	figure(t, "sessions_terminated", terminated)
	figure(t, "takeovers", st.Takeovers)
	figure(t, "leaderless_total", without)
	figure(t, "runner_total", r.done.Sub(first))
	figure(t, "converge_after_first_termination", lastAck.Sub(first))
	figure(t, "runner_waited", r.res.Waited)
	figure(t, "acks_lost", 0)
	figure(t, "queries", queries)
	figure(t, "queries_failed", failed)
	figure(t, "refused", refused)
}

// TestPostgresTerminatedUnderRunner: the contract runner's sessions are
// terminated while it waits for an acknowledgement (an agent holds a guard
// on the old snapshot), and, in a second run, while its DDL is retrying on
// a lock another session holds, after the first of two removals ran. The
// runner stops with an error; the release is left exactly where it was
// (contract, or contracting with the DDL half done, never anything in
// between); a re-run finishes the job. No query fails.
func TestPostgresTerminatedUnderRunner(t *testing.T) {
	t.Parallel()

	t.Run("mid-wait", func(t *testing.T) {
		e := setup(t)
		e.startBroadcaster(nil)
		agents, trs := e.fleetOf("pgwait", testenv.AMQPURL(), nil)
		e.waitDrained(e.flip(phase.Migrate), ids(agents)...)
		g, err := agents[0].Enter() // pins the migrate snapshot: no ack for contract
		require.NoError(t, err)
		epoch := e.flip(phase.Contract)

		app := testenv.Name("faults_runner")
		rstore, _ := e.openStore(app)
		var polls atomic.Int64
		runner := make(chan runnerResult, 1)
		go func() {
			res, err := e.contract(e.ctx, rstore, func(o *schema.ContractOptions) {
				o.Progress = func(schema.Progress) { polls.Add(1) }
			})
			runner <- runnerResult{res, err, time.Now()}
		}()
		waitFor(t, wait, "the runner to wait", func() bool { return polls.Load() >= 5 })
		terminated := e.terminate(app)
		killed := time.Now()
		require.GreaterOrEqual(t, terminated, 1)
		// The session that held the contract lock is gone: the runner
		// stops at its next poll rather than wait on without the lock.
		r := awaitRunner(t, runner, wait)
		require.Error(t, r.err, "the runner's sessions were terminated")
		stoppedAfter := r.done.Sub(killed)
		t.Logf("first run: %v", r.err)
		require.Equal(t, phase.Contract, e.phase(), "nothing changed")
		_, n := e.phaseAt(phase.Contracting)
		require.Zero(t, n)
		require.Contains(t, e.columns(), "name")
		require.True(t, e.tableExists("legacy_flavors"))

		g.Exit()
		r2, err := e.contract(e.ctx, rstore, nil)
		e.requireDroppedAfterAcks(runnerResult{res: r2, err: err}, ids(agents))
		require.Equal(t, epoch, r2.ContractEpoch)
		time.Sleep(300 * time.Millisecond)
		queries, failed, _ := requireTraffic(t, trs...)
		figure(t, "sessions_terminated", terminated)
		figure(t, "runner_stopped_after", stoppedAfter)
		figure(t, "queries", queries)
		figure(t, "queries_failed", failed)
	})

	t.Run("mid-DDL", func(t *testing.T) {
		e := setup(t)
		e.startBroadcaster(nil)
		agents, trs := e.fleetOf("pgddl", testenv.AMQPURL(), nil)
		e.waitDrained(e.flip(phase.Migrate), ids(agents)...)

		// Another session reads legacy_flavors and keeps its lock: the
		// second DROP times out on it and retries.
		blocker, err := e.db.BeginTxx(e.ctx, nil)
		require.NoError(t, err)
		defer blocker.Rollback()
		_, err = blocker.ExecContext(e.ctx, e.sql(`SELECT * FROM @app.legacy_flavors`))
		require.NoError(t, err)

		e.flip(phase.Contract)
		app := testenv.Name("faults_runner")
		rstore, _ := e.openStore(app)
		runner := make(chan runnerResult, 1)
		go func() {
			res, err := e.contract(e.ctx, rstore, func(o *schema.ContractOptions) { o.LockTimeout = 50 * time.Millisecond })
			runner <- runnerResult{res, err, time.Now()}
		}()
		waitFor(t, wait, "the first removal to be dropped", func() bool {
			return e.phase() == phase.Contracting && !contains(e.columns(), "name")
		})
		time.Sleep(300 * time.Millisecond) // a few lock timeouts and retries
		terminated := e.terminate(app)
		require.GreaterOrEqual(t, terminated, 1)
		r := awaitRunner(t, runner, wait)
		require.Error(t, r.err)
		require.Equal(t, schema.OutcomeFailed, r.res.Outcome)
		t.Logf("first run: %v", r.err)
		require.Positive(t, r.res.Attempts)

		// Consistent: contracting, the first removal done, the second not,
		// and nothing else written.
		require.Equal(t, phase.Contracting, e.phase())
		require.NotContains(t, e.columns(), "name")
		require.NotContains(t, e.columns(), "display_name")
		require.True(t, e.tableExists("legacy_flavors"))
		_, n := e.phaseAt(phase.Complete)
		require.Zero(t, n)

		require.NoError(t, blocker.Commit())
		r2, err := e.contract(context.Background(), rstore, nil)
		require.NoError(t, err)
		require.Equal(t, schema.OutcomeComplete, r2.Outcome)
		require.Equal(t, []string{`"` + e.app + `"."legacy_flavors"`}, r2.Dropped, "the re-run drops only what is left")
		e.requireDroppedAfterAcks(runnerResult{res: r2}, ids(agents))
		_, n = e.phaseAt(phase.Complete)
		require.Equal(t, 1, n)
		time.Sleep(300 * time.Millisecond)
		queries, failed, _ := requireTraffic(t, trs...)
		figure(t, "sessions_terminated", terminated)
		figure(t, "ddl_attempts_first_run", r.res.Attempts)
		figure(t, "ddl_held_off_first_run", r.res.HeldOff)
		figure(t, "queries", queries)
		figure(t, "queries_failed", failed)
	})
}

// watchLeadership samples b.IsLeader every 5 ms; the returned function
// stops sampling and reports how long b did not lead.
func watchLeadership(t *testing.T, b *broadcaster.Broadcaster) func() time.Duration {
	stop, done := make(chan struct{}), make(chan time.Duration, 1)
	go func() {
		var without time.Duration
		last := time.Now()
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				done <- without
				return
			case now := <-tick.C:
				if !b.IsLeader() {
					without += now.Sub(last)
				}
				last = now
			}
		}
	}()
	var once sync.Once
	var without time.Duration
	report := func() time.Duration {
		once.Do(func() { close(stop); without = <-done })
		return without
	}
	t.Cleanup(func() { report() })
	return report
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}
