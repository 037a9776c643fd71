package faults

import (
	"context"
	"fmt"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/agent"
	"github.com/phasecast/phasecast/internal/keys"
	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/schema"
)

// generateKeys runs 'phasecast keys generate' into a directory of the
// test's own and loads what it wrote.
func generateKeys(t *testing.T) (dir string, k keys.Keys) {
	t.Helper()
	dir = t.TempDir()
	run(t, binary(t, "phasecast"), "keys", "generate", "--dir", dir)
	k, err := keys.Load(keys.LoadOptions{
		StateKeyFile:  filepath.Join(dir, keys.StateKeyFile),
		StatePubFile:  filepath.Join(dir, keys.StatePubFile),
		StatusMACFile: filepath.Join(dir, keys.StatusMACFile),
	})
	require.NoError(t, err)
	return dir, k
}

// broadcasterRow returns a broadcaster's liveness row, if it has one.
func (e *env) broadcasterRow(id string) (schema.Broadcaster, bool) {
	e.t.Helper()
	rep, err := e.store.Report(e.ctx, 0)
	require.NoError(e.t, err)
	for _, b := range rep.Broadcasters {
		if b.ID == id {
			return b, true
		}
	}
	return schema.Broadcaster{}, false
}

// TestLeaderKilledBeforePublishing: two 'phasecast broadcast' processes,
// signed. The leader is stopped (SIGSTOP), a flip to contract commits,
// and the leader is killed with SIGKILL before it could publish. The
// standby takes the lock, publishes the flip, and every agent acknowledges
// it; the runner drops after the last ack, and no query fails.
func TestLeaderKilledBeforePublishing(t *testing.T) {
	t.Parallel()
	e := setup(t)
	bin := binary(t, "phasecast")
	keyDir, k := generateKeys(t)
	broadcast := func(id string) *testenv.Proc {
		return startProc(t, id, bin, "broadcast",
			"--database-url", testenv.DatabaseURL(), "--amqp-url", testenv.AMQPURL(),
			"--schema", e.store.Schema(), "--exchange-prefix", e.prefix, "--id", id,
			"--lease", lease.String(), "--beacon-interval", beacon.String(),
			"--liveness-interval", liveness.String(), "--poll-interval", outboxPoll.String(),
			"--state-key", filepath.Join(keyDir, keys.StateKeyFile), "--status-mac", filepath.Join(keyDir, keys.StatusMACFile),
			"--log-format", "json", "--log-level", "debug")
	}
	leaderID, standbyID := "leader-"+e.prefix, "standby-"+e.prefix
	leader := broadcast(leaderID)
	waitFor(t, wait, "the first broadcaster to lead", func() bool { b, ok := e.broadcasterRow(leaderID); return ok && b.Leader })
	standby := broadcast(standbyID)
	waitFor(t, wait, "the second broadcaster to stand by", func() bool { _, ok := e.broadcasterRow(standbyID); return ok })
	row, _ := e.broadcasterRow(leaderID)
	require.Equal(t, leader.PID, row.PID)

	agentDB := e.agentDB(4)
	svcDB := e.serviceDB("faults-kill", 8)
	var cfgs []agent.Config
	for i := range 4 {
		db := agentDB
		if i >= 2 {
			db = nil
		}
		cfg := e.agentConfig(fmt.Sprintf("kill-%d", i), db)
		cfg.StateKey, cfg.StatusMACKey = k.StatePublic, k.StatusMAC
		cfgs = append(cfgs, cfg)
	}
	agents := e.startAgents(cfgs)
	var trs []*traffic
	for _, a := range agents {
		trs = append(trs, e.runTraffic(a, svcDB, 2))
	}
	e.waitDrained(e.flip(phase.Migrate), ids(agents)...)

	// Stop the leader, then commit the flip. A leader stopped in the
	// middle of recording statuses holds nothing a flip waits for: it
	// records each batch in one statement, which the server finishes
	// without it (see TestFrozenClientReleasesEpochLock).
	leader.Signal(syscall.SIGSTOP)
	ctx, cancel := context.WithTimeout(e.ctx, time.Second)
	res, err := e.store.Flip(ctx, "L", phase.Contract, schema.FlipOptions{Actor: "faults"})
	cancel()
	require.NoError(t, err, "a flip while the leader is stopped")
	epoch := res.Epoch
	time.Sleep(300 * time.Millisecond)
	require.Equal(t, epoch, mustUnpublished(t, e), "the stopped leader cannot have published the flip, nor the standby")
	for _, a := range agents {
		require.Less(t, a.Stats().AppliedEpoch, epoch, a.ID())
	}
	killed := time.Now()
	leader.Signal(syscall.SIGKILL)
	waitExit(t, leader, wait)

	var tookOver, published time.Duration
	waitFor(t, wait, "the standby to lead", func() bool {
		b, _ := e.broadcasterRow(standbyID)
		return b.Leader
	})
	tookOver = time.Since(killed)
	waitFor(t, wait, "the standby to publish the flip", func() bool { return mustUnpublished(t, e) == 0 })
	published = time.Since(killed)
	e.waitDrained(epoch, ids(agents)...)
	acked := time.Since(killed)

	r, err := e.contract(e.ctx, e.store, nil)
	e.requireDroppedAfterAcks(runnerResult{res: r, err: err}, ids(agents))
	time.Sleep(300 * time.Millisecond)
	queries, failed, refused := requireTraffic(t, trs...)
	for _, a := range agents {
		require.Empty(t, a.Stats().RejectedMessages, "agent %s rejected messages of the signed broadcaster", a.ID())
	}
	require.Contains(t, standby.Output(), "became leader")
	figure(t, "takeover", tookOver)
	figure(t, "published_after_kill", published)
	figure(t, "all_acked_after_kill", acked)
	figure(t, "acks_lost", 0)
	figure(t, "queries", queries)
	figure(t, "queries_failed", failed)
	figure(t, "refused", refused)
}
