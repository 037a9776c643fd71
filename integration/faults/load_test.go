package faults

import (
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/agent"
	"github.com/phasecast/phasecast/broadcaster"
	"github.com/phasecast/phasecast/internal/phase"
)

// epochLog records the epochs an agent's snapshots took, in the order
// OnChange saw them.
type epochLog struct {
	mu     sync.Mutex
	epochs []int64
}

func (l *epochLog) onChange(old, cur *agent.Snapshot) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.epochs) == 0 {
		l.epochs = append(l.epochs, old.Epoch())
	}
	l.epochs = append(l.epochs, cur.Epoch())
}

func (l *epochLog) get() []int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.epochs)
}

// TestLoad: 200 agents (half with a store connection, half without), and
// 50 flips in a row, migrate and contract in turn, each waited for until
// every agent has acknowledged it in the store. Every flip is
// acknowledged by every agent, and no agent's epochs ever go backwards:
// neither the snapshots it swaps in nor the epochs the store records for it.
func TestLoad(t *testing.T) {
	// Not parallel: it runs alone, before the parallel tests start.
	const (
		nAgents = 200
		nFlips  = 50
	)
	e := setup(t)
	b := e.startBroadcaster(func(c *broadcaster.Config) { c.LeaseDuration = 10 * time.Second })
	agentDB := e.agentDB(10)
	logs := make([]*epochLog, nAgents)
	cfgs := make([]agent.Config, nAgents)
	for i := range nAgents {
		db := agentDB
		if i%2 == 1 {
			db = nil
		}
		logs[i] = &epochLog{}
		cfgs[i] = e.agentConfig(fmt.Sprintf("load-%03d", i), db)
		cfgs[i].HeartbeatInterval, cfgs[i].LeaseMargin = 2*time.Second, time.Second
		cfgs[i].OnChange = logs[i].onChange
	}
	started := time.Now()
	agents := e.startAgents(cfgs)
	startup := time.Since(started)
	all := ids(agents)

	var took []time.Duration
	var last int64
	begin := time.Now()
	for i := range nFlips {
		to := phase.Migrate
		if i%2 == 1 {
			to = phase.Contract
		}
		flipped := time.Now()
		epoch := e.flip(to)
		require.Greater(t, epoch, last)
		last = epoch
		waitFor(t, wait, fmt.Sprintf("all %d agents to acknowledge flip %d (epoch %d)", nAgents, i+1, epoch),
			func() bool { return e.storeDrained(epoch, all...) })
		took = append(took, time.Since(flipped))
	}
	total := time.Since(begin)

	for i, a := range agents {
		st := a.Stats()
		require.Equal(t, last, st.AppliedEpoch, a.ID())
		require.Equal(t, last, st.DrainedEpoch, a.ID())
		epochs := logs[i].get()
		require.NotEmpty(t, epochs, a.ID())
		for j := 1; j < len(epochs); j++ {
			require.Greater(t, epochs[j], epochs[j-1], "agent %s went from epoch %d back to %d", a.ID(), epochs[j-1], epochs[j])
		}
		require.Equal(t, last, epochs[len(epochs)-1], a.ID())
	}
	var backwards, recorded int
	require.NoError(t, e.db.GetContext(e.ctx, &backwards, e.sql(`
		SELECT count(*) FROM (
			SELECT applied_epoch < lag(applied_epoch) OVER w OR drained_epoch < lag(drained_epoch) OVER w OR seq <= lag(seq) OVER w AS back
			FROM @store.status_log WINDOW w AS (PARTITION BY agent_id ORDER BY id)) x
		WHERE back`)))
	require.Zero(t, backwards, "the store recorded an epoch or seq going backwards")
	require.NoError(t, e.db.GetContext(e.ctx, &recorded, e.sql(`SELECT count(*) FROM @store.status_log`)))

	sorted := slices.Clone(took)
	slices.Sort(sorted)
	figure(t, "agents", nAgents)
	figure(t, "flips", nFlips)
	figure(t, "startup", startup)
	figure(t, "all_acked_per_flip_p50", median(took))
	figure(t, "all_acked_per_flip_p90", sorted[len(sorted)*9/10])
	figure(t, "all_acked_per_flip_max", sorted[len(sorted)-1])
	figure(t, "fifty_flips_total", total)
	figure(t, "statuses_recorded", recorded)
	figure(t, "acks_lost", 0)
	figure(t, "epochs_backwards", backwards)
	figure(t, "grants_dropped", b.Stats().GrantsDropped)
}
