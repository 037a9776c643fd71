package faults

import (
	"database/sql"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/agent"
	"github.com/phasecast/phasecast/broadcaster"
	"github.com/phasecast/phasecast/internal/config"
	"github.com/phasecast/phasecast/internal/faultproxy"
	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/schema"
)

// idleInTransaction returns the pid and transaction start of a session with
// appName that sits idle inside a transaction holding the epoch row, if
// there is one.
func (e *env) idleInTransaction(appName string) (pid int, xactStart string, ok bool) {
	e.t.Helper()
	var rows []struct {
		PID   int    `db:"pid"`
		Start string `db:"xact_start"`
	}
	require.NoError(e.t, e.db.SelectContext(e.ctx, &rows, e.sql(`
		SELECT a.pid, a.xact_start::text AS xact_start FROM pg_stat_activity a
		WHERE a.application_name = $1 AND a.state = 'idle in transaction'
		  AND EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid AND l.relation = '@store.epoch'::regclass AND l.mode = 'RowShareLock')`), appName))
	if len(rows) == 0 {
		return 0, "", false
	}
	return rows[0].PID, rows[0].Start, true
}

// TestFrozenClientReleasesEpochLock: a client's link to the database
// freezes while its transaction holds the epoch row FOR SHARE, which every
// flip waits for (what a SIGSTOP, a debugger or a paused VM does to a
// service). Only an agent's sync through the store (Store.SyncAgent) is
// such a transaction: it must read the state under the lock, so it is
// several statements. The server ends that idle transaction after 10 s,
// so a flip waits at most that long; once the link is back the agent
// recovers and acknowledges through the store. The broadcaster records
// statuses in one statement, so freezing it holds nothing: a flip goes
// straight through.
func TestFrozenClientReleasesEpochLock(t *testing.T) {
	t.Parallel()

	t.Run("agent frozen in its store sync", func(t *testing.T) {
		t.Parallel()
		e := setup(t)
		p, dsn, app := e.frozenLink()
		db, err := sql.Open("postgres", dsn)
		require.NoError(t, err)
		t.Cleanup(func() { db.Close() })
		// No broker: every heartbeat goes through the store, so a sync
		// transaction is open much of the time.
		var cfgs []agent.Config
		for i := range 12 {
			cfg := e.agentConfig(fmt.Sprintf("frozen-%d", i), db)
			cfg.AMQPURL = "amqp://guest:guest@127.0.0.1:1/"
			cfg.HeartbeatInterval = 20 * time.Millisecond
			cfgs = append(cfgs, cfg)
		}
		agents := e.startAgents(cfgs)
		e.waitDrained(e.flip(phase.Migrate), ids(agents)...)

		frozenPID := e.freezeInsideTransaction(p, app)
		frozen := time.Now()
		epoch := e.flip(phase.Contract) // waits for the frozen transaction's lock
		blocked := time.Since(frozen)
		require.Greater(t, blocked, 5*time.Second, "the flip did wait for the frozen transaction")
		require.Less(t, blocked, 15*time.Second, "the server ended the frozen transaction after 10 s")
		var gone bool
		require.NoError(t, e.db.GetContext(e.ctx, &gone, `SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)`, frozenPID))
		require.True(t, gone, "the frozen session was ended")

		p.Blackhole(false)
		healed := time.Now()
		e.waitDrained(epoch, ids(agents)...)
		figure(t, "flip_blocked_for", blocked)
		figure(t, "acked_after_heal", time.Since(healed))
	})

	t.Run("broadcaster frozen while recording", func(t *testing.T) {
		t.Parallel()
		e := setup(t)
		p, dsn, app := e.frozenLink()
		bstore, err := schema.Open(e.ctx, dsn, e.store.Schema())
		require.NoError(t, err)
		t.Cleanup(func() { bstore.Close() })
		e.startBroadcaster(func(c *broadcaster.Config) { c.Store, c.DatabaseURL = bstore, dsn })
		// Many frequent heartbeats: a status batch is being recorded most
		// of the time.
		var cfgs []agent.Config
		for i := range 12 {
			cfg := e.agentConfig(fmt.Sprintf("frozen-%d", i), nil)
			cfg.HeartbeatInterval = 50 * time.Millisecond
			cfgs = append(cfgs, cfg)
		}
		agents := e.startAgents(cfgs)
		e.waitDrained(e.flip(phase.Migrate), ids(agents)...)

		// Freeze it with a recording in flight, then flip.
		waitFor(t, 30*time.Second, "the broadcaster to be recording statuses", func() bool {
			return e.sessionActive(app)
		})
		p.Blackhole(true)
		frozen := time.Now()
		epoch := e.flip(phase.Contract)
		blocked := time.Since(frozen)
		require.Less(t, blocked, 2*time.Second, "nothing the frozen broadcaster had open held the flip")

		p.Blackhole(false)
		healed := time.Now()
		e.waitDrained(epoch, ids(agents)...)
		figure(t, "flip_blocked_for", blocked)
		figure(t, "acked_after_heal", time.Since(healed))
	})
}

// frozenLink is a database link through a fault proxy, and its
// application_name, for a client the test will freeze.
func (e *env) frozenLink() (p *faultproxy.Proxy, dsn, app string) {
	e.t.Helper()
	pgHost, err := faultproxy.HostPort(testenv.DatabaseURL())
	require.NoError(e.t, err)
	p = faultproxy.Start(e.t, pgHost)
	app = testenv.Name("faults_frozen")
	dsn, err = config.WithApplicationName(p.URL(testenv.DatabaseURL()), app)
	require.NoError(e.t, err)
	return p, dsn, app
}

// freezeInsideTransaction black-holes p at a moment a session with app
// sits idle inside a transaction holding the epoch row, and returns its
// pid.
func (e *env) freezeInsideTransaction(p *faultproxy.Proxy, app string) int {
	e.t.Helper()
	var frozenPID int
	waitFor(e.t, 30*time.Second, "a client to be caught inside a transaction", func() bool {
		if _, _, ok := e.idleInTransaction(app); !ok {
			return false
		}
		p.Blackhole(true)
		time.Sleep(50 * time.Millisecond)
		if pid, start, ok := e.idleInTransaction(app); ok {
			time.Sleep(50 * time.Millisecond)
			if pid2, start2, ok := e.idleInTransaction(app); ok && pid2 == pid && start2 == start {
				frozenPID = pid
				return true
			}
		}
		p.Blackhole(false)
		return false
	})
	return frozenPID
}

// sessionActive reports whether a session with appName is running a
// statement now.
func (e *env) sessionActive(appName string) bool {
	e.t.Helper()
	var n int
	require.NoError(e.t, e.db.GetContext(e.ctx, &n, `SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND state = 'active'`, appName))
	return n > 0
}
