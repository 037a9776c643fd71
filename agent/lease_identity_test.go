package agent

import (
	"context"
	"math"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/internal/wire"
	"github.com/phasecast/phasecast/schema"
)

// The tests here do not run in parallel: a fenced agent whose statuses
// the store ignores re-syncs on every heartbeat and every Enter, and they
// poll; alongside the parallel tests they would crowd out the single,
// serial fake broadcasters those depend on for their grants.

// storeAhead checks the README's lease guarantee at one moment: the lease
// the store holds for the agent (on the database clock) runs out no
// earlier than the agent's own deadline, so the runner counts the agent
// live for as long as the agent considers itself unfenced. Both clocks are
// this machine's; the store is read after the agent, and the time between
// the two reads is credited to the store.
func storeAhead(t *testing.T, a *Agent) (agentLeft, storeLeft time.Duration) {
	t.Helper()
	before := time.Now()
	st := a.Stats()
	row := agentRow(t, a.store, a.ID())
	between := time.Since(before)
	return st.LeaseRemaining, time.Duration(row.LeaseRemainingMS)*time.Millisecond + between
}

// TestShortBroadcasterLeaseKeepsStoreAheadOfAgent: an agent with a DB
// registers its long initial lease at start; its first status through a
// broadcaster that grants a much shorter lease must not cut the store's
// expiry below the agent's own deadline, which only moves later.
func TestShortBroadcasterLeaseKeepsStoreAheadOfAgent(t *testing.T) {
	b := setup(t, fakeOptions{lease: time.Second})
	cfg := b.config(t, true)
	cfg.InitialLease = 10 * time.Second
	a := startAgent(t, cfg)
	// Start returned on the fake's first grant: that status is recorded
	// with the fake's 1 s lease. Check across a few heartbeats.
	for range 5 {
		agentLeft, storeLeft := storeAhead(t, a)
		require.False(t, a.Stats().Fenced)
		require.GreaterOrEqual(t, storeLeft+10*time.Millisecond, agentLeft,
			"the store's lease (%s left) runs out before the agent's own (%s left): the runner would count it gone while it serves", storeLeft, agentLeft)
		time.Sleep(cfg.HeartbeatInterval)
	}
}

// TestIgnoredStatusLeavesAgentFenced: a status the store does not record
// must not extend the agent's lease. Here a status with a huge seq is
// recorded under the agent's ID (a bug, a clock far ahead, or a forgery
// without a status key); the agent's own statuses are then not newer. An
// agent that extended its lease anyway would serve while the store counts
// it gone.
func TestIgnoredStatusLeavesAgentFenced(t *testing.T) {
	b := setup(t, fakeOptions{lease: time.Second})
	cfg := b.config(t, true)
	cfg.InitialLease = time.Second
	a := startAgent(t, cfg)
	ctx := context.Background()

	b.fake.answering.Store(false) // the agent renews through the store only
	huge := testenv.Credentials(wire.Status{V: wire.StatusVersion, Kind: wire.KindStatus, AgentID: a.ID(), Service: cfg.Service, Host: "elsewhere", PID: 1,
		Seq: math.MaxInt64, Releases: []string{"L"}, SentAt: time.Now()})
	_, err := b.store.RecordStatusBatch(ctx, []wire.Status{huge}, 300*time.Millisecond)
	require.NoError(t, err)

	// Whenever the agent serves, the store must count it live.
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) {
		g, err := a.Enter()
		if err == nil {
			row := agentRow(t, b.store, a.ID())
			g.Exit()
			require.Positive(t, row.LeaseRemainingMS, "the agent serves while the store's lease for it expired %d ms ago (seq %d recorded)", -row.LeaseRemainingMS, row.Seq)
		}
		time.Sleep(150 * time.Millisecond)
	}
	// The status above came from no incarnation of this agent's, so once
	// its 300 ms were over the agent's own took the row back.
	row := agentRow(t, b.store, a.ID())
	require.Equal(t, a.incarnation, row.Incarnation)

	// A huge seq from this very incarnation, even with its token (a bug,
	// or a token that leaked), is refused rather than recorded: it would
	// have had the store ignore every later status of the agent. The
	// agent's own statuses keep being recorded and it keeps serving.
	huge.Incarnation, huge.Token = a.incarnation, a.token
	rec, err := b.store.RecordStatusBatch(ctx, []wire.Status{huge}, 300*time.Millisecond)
	require.NoError(t, err)
	require.Empty(t, rec.Kept)
	require.Equal(t, []schema.Refusal{{StatusKey: schema.StatusKey{AgentID: a.ID(), Incarnation: a.incarnation}, Reason: schema.RefusedSeqBound}}, rec.Refused)
	seq := agentRow(t, b.store, a.ID()).Seq
	require.Less(t, seq, int64(math.MaxInt64))
	require.Eventually(t, func() bool { return agentRow(t, b.store, a.ID()).Seq > seq }, 10*time.Second, 50*time.Millisecond,
		"the agent's own statuses are no longer recorded")
	g, err := a.Enter()
	require.NoError(t, err)
	g.Exit()
	require.False(t, a.Stats().Fenced)
}

// TestDuplicateIDLoserStaysFenced: two live processes configured with one
// ID (the README's example hard-codes one; a replaced pod can overlap the
// old one). The store keeps one of them; the other must not serve, and
// the ID must not count as acknowledged while both claim it.
func TestDuplicateIDLoserStaysFenced(t *testing.T) {
	b := setup(t, fakeOptions{})
	applyRelease(t, b.store, manifestL)
	epoch := flip(t, b.store, "L", phase.Migrate, phase.Contract)
	cfg := b.config(t, true)
	cfg.ID = "nova-api-1"
	first := startAgent(t, cfg)
	require.Eventually(t, func() bool { return agentRow(t, b.store, cfg.ID).DrainedEpoch >= epoch }, 10*time.Second, 10*time.Millisecond)

	second, err := New(cfg)
	require.NoError(t, err)
	startCtx, cancelStart := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancelStart()
	started := make(chan error, 1)
	go func() { started <- second.Start(startCtx) }()
	t.Cleanup(func() { stopAgent(t, second) })

	// Once the second process has made its claim (its start sync read the
	// state), for two leases: never both serving, and the ID never
	// acknowledged.
	require.Eventually(t, func() bool { return second.Stats().AppliedEpoch >= 0 }, 10*time.Second, 5*time.Millisecond)
	deadline := time.Now().Add(2 * b.fake.lease)
	for time.Now().Before(deadline) {
		g1, err1 := first.Enter()
		g2, err2 := second.Enter()
		if err1 == nil {
			g1.Exit()
		}
		if err2 == nil {
			g2.Exit()
		}
		require.False(t, err1 == nil && err2 == nil, "both processes claiming ID %s serve", cfg.ID)
		row := agentRow(t, b.store, cfg.ID)
		require.False(t, row.Acked("L", epoch), "ID %s counts as acknowledged while two live processes claim it", cfg.ID)
		time.Sleep(150 * time.Millisecond)
	}
	// The store shows both processes, and the loser knows why it waits.
	row := agentRow(t, b.store, cfg.ID)
	require.Equal(t, first.incarnation, row.Incarnation)
	require.Len(t, row.Rivals, 1)
	require.Equal(t, second.incarnation, row.Rivals[0].Incarnation)
	require.Positive(t, second.Stats().StatusesIgnored)
	_, err = second.Enter()
	require.ErrorIs(t, err, ErrStale)
	require.ErrorIs(t, err, schema.ErrStatusIgnored)
	require.ErrorContains(t, err, "held by another live process")

	// The first says goodbye: the second's next status takes the ID, its
	// Start returns, it serves and acknowledges, and the conflict is over.
	stopAgent(t, first)
	require.NoError(t, <-started)
	g, err := second.Enter()
	require.NoError(t, err)
	g.Exit()
	require.Eventually(t, func() bool {
		row := agentRow(t, b.store, cfg.ID)
		return row.Incarnation == second.incarnation && row.Acked("L", epoch)
	}, 10*time.Second, 10*time.Millisecond)
	require.Empty(t, agentRow(t, b.store, cfg.ID).Rivals)
}
