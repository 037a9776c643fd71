package faults

import (
	"database/sql"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/agent"
	"github.com/phasecast/phasecast/broadcaster"
	"github.com/phasecast/phasecast/internal/keys"
	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/testenv"
)

// TestServiceKilled: an examples/novalike process, run signed with the
// keys 'phasecast keys generate' wrote (--state-pub, --status-mac), is
// killed with SIGKILL just before a flip to contract. It never
// acknowledges; its lease expires on the database clock, and the runner
// proceeds after that moment, not before, while the surviving agents'
// queries never fail.
func TestServiceKilled(t *testing.T) {
	t.Parallel()
	e := setup(t)
	keyDir, k := generateKeys(t)
	// The lease outlasts novalike's default heartbeat (2 s) and lease
	// margin (1 s).
	const serviceLease = 4 * time.Second
	e.startBroadcaster(func(c *broadcaster.Config) {
		c.LeaseDuration, c.SigningKey, c.StatusMACKey = serviceLease, k.StatePrivate, k.StatusMAC
	})
	victim := startProc(t, "novalike", binary(t, "novalike"),
		"--service", "victim", "--workers", "2", "--table", e.table,
		"--database-url", testenv.DatabaseURL(), "--amqp-url", testenv.AMQPURL(),
		"--schema", e.store.Schema(), "--exchange-prefix", e.prefix,
		"--state-pub", filepath.Join(keyDir, keys.StatePubFile), "--status-mac", filepath.Join(keyDir, keys.StatusMACFile))
	var victimID string
	waitFor(t, wait, "the novalike process to register", func() bool {
		agents, err := e.store.LiveAgents(e.ctx)
		require.NoError(t, err)
		for _, a := range agents {
			if a.Service == "victim" {
				require.Equal(t, victim.PID, a.PID)
				victimID = a.ID
				return true
			}
		}
		return false
	})

	agentDB := e.agentDB(4)
	svcDB := e.serviceDB("faults-survivors", 8)
	var cfgs []agent.Config
	for i, db := range []*sql.DB{agentDB, nil} {
		cfg := e.agentConfig("survivor-"+strconv.Itoa(i), db)
		cfg.StateKey, cfg.StatusMACKey = k.StatePublic, k.StatusMAC
		cfgs = append(cfgs, cfg)
	}
	survivors := e.startAgents(cfgs)
	var trs []*traffic
	for _, a := range survivors {
		trs = append(trs, e.runTraffic(a, svcDB, 2))
	}
	// The signed process applies and acknowledges a flip like any agent.
	e.waitDrained(e.flip(phase.Migrate), append(ids(survivors), victimID)...)

	victim.Signal(syscall.SIGKILL)
	killed := time.Now()
	waitExit(t, victim, wait)
	epoch := e.flip(phase.Contract)
	r, err := e.contract(e.ctx, e.store, nil)
	e.requireDroppedAfterAcks(runnerResult{res: r, err: err}, ids(survivors))

	decided, _ := e.phaseAt(phase.Contracting)
	expiry := e.lastLease(victimID)
	_, acked := e.ackTimes(epoch)[victimID]
	require.False(t, acked, "a killed process cannot acknowledge")
	require.False(t, decided.Before(expiry), "the runner decided at %s, before the killed service's lease expired at %s", decided, expiry)
	for _, a := range r.Acked {
		require.NotEqual(t, victimID, a.ID)
	}
	time.Sleep(300 * time.Millisecond)
	queries, failed, refused := requireTraffic(t, trs...)
	figure(t, "lease_left_at_kill", expiry.Sub(killed))
	figure(t, "runner_after_lease_expiry", decided.Sub(expiry))
	figure(t, "runner_waited", r.Waited)
	figure(t, "queries", queries)
	figure(t, "queries_failed", failed)
	figure(t, "refused", refused)
}
