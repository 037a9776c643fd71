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

// TestFrozenClientReleasesEpochLock: a client's link to the database
// freezes while it is recording a status (what a SIGSTOP, a debugger or a
// paused VM does to a service). Every flip waits for the epoch row lock
// that recording takes, so a client that could sit inside such a
// transaction would hold every flip. Neither can: an agent's sync through
// the store is one call of agent_sync, and the broadcaster records a batch
// in one statement, so freezing either holds nothing once the server has
// the statement; a flip goes straight through, and once the link is back
// the agents acknowledge.
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
		// is in flight much of the time.
		var cfgs []agent.Config
		for i := range 12 {
			cfg := e.agentConfig(fmt.Sprintf("frozen-%d", i), db)
			cfg.AMQPURL = "amqp://guest:guest@127.0.0.1:1/"
			cfg.HeartbeatInterval = 20 * time.Millisecond
			cfgs = append(cfgs, cfg)
		}
		agents := e.startAgents(cfgs)
		e.waitDrained(e.flip(phase.Migrate), ids(agents)...)

		waitFor(t, 30*time.Second, "an agent to be syncing through the store", func() bool {
			return e.sessionActive(app)
		})
		p.Blackhole(true)
		frozen := time.Now()
		epoch := e.flip(phase.Contract)
		blocked := time.Since(frozen)
		require.Less(t, blocked, 2*time.Second, "nothing the frozen agents had open held the flip")

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

// sessionActive reports whether a session with appName is running a
// statement now.
func (e *env) sessionActive(appName string) bool {
	e.t.Helper()
	var n int
	require.NoError(e.t, e.db.GetContext(e.ctx, &n, `SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND state = 'active'`, appName))
	return n > 0
}
