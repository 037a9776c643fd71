package schema_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/internal/wire"
	"github.com/phasecast/phasecast/schema"
)

// leaseStatus is a status of agent id with seq.
func leaseStatus(id string, seq uint64) wire.Status {
	return testenv.Credentials(wire.Status{V: wire.StatusVersion, Kind: wire.KindStatus, AgentID: id, Service: "svc", Host: "h", PID: 1, Seq: seq, SentAt: time.Now()})
}

func leaseExpiry(t *testing.T, store *schema.Store, id string) time.Time {
	t.Helper()
	return agentByID(t, store, id).LeaseExpiresAt
}

// TestShorterLeaseNeverMovesExpiryEarlier: a status recorded with a
// shorter lease than the last one (a broadcaster run with a shorter
// --lease, a standby taking over, an agent's sync after its long initial
// lease) must not move the store's expiry earlier than one it already
// granted: the agent's own deadline was set from the longer lease. Only a
// goodbye ends a lease early.
func TestShorterLeaseNeverMovesExpiryEarlier(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	store := testenv.Store(t)

	// Through the broadcaster's path: 10 s, then 3 s.
	_, err := store.RecordStatusBatch(ctx, []wire.Status{leaseStatus("a", 1)}, 10*time.Second)
	require.NoError(t, err)
	long := leaseExpiry(t, store, "a")
	_, err = store.RecordStatusBatch(ctx, []wire.Status{leaseStatus("a", 2)}, 3*time.Second)
	require.NoError(t, err)
	require.False(t, leaseExpiry(t, store, "a").Before(long), "a 3 s lease moved the expiry of a 10 s one earlier")

	// Through an agent's own sync (its initial lease), then a batch.
	_, err = store.SyncAgent(ctx, leaseStatus("b", 1), 10*time.Second)
	require.NoError(t, err)
	long = leaseExpiry(t, store, "b")
	_, err = store.RecordStatusBatch(ctx, []wire.Status{leaseStatus("b", 2)}, 3*time.Second)
	require.NoError(t, err)
	require.False(t, leaseExpiry(t, store, "b").Before(long), "a broadcaster's 3 s lease moved the expiry of the agent's 10 s sync earlier")
	_, err = store.SyncAgent(ctx, leaseStatus("b", 3), time.Second)
	require.NoError(t, err)
	require.False(t, leaseExpiry(t, store, "b").Before(long), "a 1 s sync moved the expiry of a 10 s lease earlier")

	// A longer lease still extends it.
	_, err = store.RecordStatusBatch(ctx, []wire.Status{leaseStatus("b", 4)}, time.Minute)
	require.NoError(t, err)
	require.True(t, leaseExpiry(t, store, "b").After(long.Add(40*time.Second)))

	// A goodbye ends it at once, whatever was granted.
	bye := leaseStatus("b", 5)
	bye.Leaving = true
	_, err = store.RecordStatusBatch(ctx, []wire.Status{bye}, 0)
	require.NoError(t, err)
	live, err := store.LiveAgents(ctx)
	require.NoError(t, err)
	for _, a := range live {
		require.NotEqual(t, "b", a.ID, "a goodbye left the lease running")
	}
}

// incarnationStatus is a status of agent id from process incarnation.
func incarnationStatus(id, incarnation, host string, seq uint64, drained int64) wire.Status {
	st := leaseStatus(id, seq)
	st.Incarnation, st.Host, st.Releases, st.AppliedEpoch, st.DrainedEpoch = incarnation, host, []string{"L"}, drained, drained
	return testenv.Credentials(st)
}

func agentByID(t *testing.T, store *schema.Store, id string) schema.Agent {
	t.Helper()
	agents, err := store.Agents(context.Background())
	require.NoError(t, err)
	for _, a := range agents {
		if a.ID == id {
			return a
		}
	}
	require.FailNow(t, "agent not registered", id)
	return schema.Agent{}
}

func conflicted(t *testing.T, store *schema.Store, id string) bool {
	ag := agentByID(t, store, id)
	return ag.Conflicted()
}

// TestSecondLiveIncarnationIsAConflict: a status from another process
// (incarnation) under an ID whose holder's lease is live is not recorded
// as the ID's state, whatever its seq; the ID is marked conflicted, with
// both processes visible, and never counts as acknowledged; the loser's
// sync says why it was ignored. Once the holder's lease ends, the other
// process takes the row, even with a lower seq (a clock stepped back
// across a restart).
func TestSecondLiveIncarnationIsAConflict(t *testing.T) {
	t.Parallel()
	b, epoch := setupAcked(t, "other")
	ctx := b.ctx
	store := b.store

	rec, err := store.RecordStatusBatch(ctx, []wire.Status{incarnationStatus("nova-api-1", "inc-a", "host-a", 100, epoch)}, time.Minute)
	require.NoError(t, err)
	require.Equal(t, []schema.StatusKey{{AgentID: "nova-api-1", Incarnation: "inc-a"}}, rec.Kept)

	// B's seq is higher: seq no longer orders across processes.
	rec, err = store.RecordStatusBatch(ctx, []wire.Status{incarnationStatus("nova-api-1", "inc-b", "host-b", 1<<62, epoch)}, time.Minute)
	require.NoError(t, err)
	require.Empty(t, rec.Kept)
	require.Equal(t, []schema.StatusKey{{AgentID: "nova-api-1", Incarnation: "inc-b"}}, rec.Conflicts)
	ag := agentByID(t, store, "nova-api-1")
	require.Equal(t, "inc-a", ag.Incarnation)
	require.Equal(t, "host-a", ag.Host, "the rival's status became the ID's state")
	require.True(t, ag.Conflicted())
	require.Len(t, ag.Rivals, 1)
	require.Equal(t, "host-b", ag.Rivals[0].Host)
	require.False(t, ag.Acked("L", epoch), "a conflicted ID counted as acknowledged")
	require.Contains(t, ag.ConflictNote(), "host host-b")

	// The loser's own sync is ignored, and says why.
	_, err = store.SyncAgent(ctx, incarnationStatus("nova-api-1", "inc-b", "host-b", 1<<62+1, epoch), time.Minute)
	var ignored *schema.StatusIgnoredError
	require.ErrorAs(t, err, &ignored)
	require.ErrorIs(t, err, schema.ErrStatusIgnored)
	require.True(t, ignored.Conflict)
	require.Equal(t, "host-a", ignored.HolderHost)
	require.Contains(t, err.Error(), "held by another live process")

	// The runner waits for it, and says why.
	res, err := store.Contract(ctx, "L", fast(schema.ContractOptions{DryRun: true}))
	require.NoError(t, err)
	require.Len(t, res.Acked, 1)
	require.Len(t, res.Missing, 1)
	require.Equal(t, "nova-api-1", res.Missing[0].ID)
	timeout, err := store.Contract(ctx, "L", fast(schema.ContractOptions{Timeout: 300 * time.Millisecond}))
	require.ErrorIs(t, err, schema.ErrAckTimeout)
	require.Equal(t, schema.OutcomeTimeout, timeout.Outcome)
	require.Contains(t, err.Error(), "ID claimed by two live processes")
	n, err := store.CountAcked(ctx, "L", epoch, "nova-api-1")
	require.NoError(t, err)
	require.Zero(t, n, "the count in SQL took a conflicted ID for an acknowledgement")

	// The holder's own statuses are still recorded; the conflict stands.
	rec, err = store.RecordStatusBatch(ctx, []wire.Status{incarnationStatus("nova-api-1", "inc-a", "host-a", 101, epoch)}, time.Minute)
	require.NoError(t, err)
	require.True(t, rec.Has("nova-api-1", "inc-a"))
	require.True(t, conflicted(t, store, "nova-api-1"))

	// A says goodbye: B takes the row with its next status, though A's seq
	// was far below B's and B's is now below an old one of A's clock.
	bye := incarnationStatus("nova-api-1", "inc-a", "host-a", 102, epoch)
	bye.Leaving = true
	_, err = store.RecordStatusBatch(ctx, []wire.Status{bye}, 0)
	require.NoError(t, err)
	_, err = store.SyncAgent(ctx, incarnationStatus("nova-api-1", "inc-b", "host-b", 5, epoch), time.Minute)
	require.NoError(t, err)
	ag = agentByID(t, store, "nova-api-1")
	require.Equal(t, "inc-b", ag.Incarnation)
	require.Equal(t, int64(5), ag.Seq)
	require.False(t, ag.Conflicted(), "the holder is nobody's rival")
	require.True(t, ag.Acked("L", epoch))
	n, err = store.CountAcked(ctx, "L", epoch, "nova-api-1")
	require.NoError(t, err)
	require.Equal(t, 1, n)

	// Within one incarnation seq still orders: a replay is ignored, not a
	// conflict.
	_, err = store.SyncAgent(ctx, incarnationStatus("nova-api-1", "inc-b", "host-b", 5, epoch), time.Minute)
	require.ErrorAs(t, err, &ignored)
	require.False(t, ignored.Conflict)

	// A rival's claim lasts the lease it asked for, then stops counting.
	rec, err = store.RecordStatusBatch(ctx, []wire.Status{incarnationStatus("nova-api-1", "inc-c", "host-c", 1, epoch)}, 200*time.Millisecond)
	require.NoError(t, err)
	require.Len(t, rec.Conflicts, 1)
	require.True(t, conflicted(t, store, "nova-api-1"))
	require.Eventually(t, func() bool { return !conflicted(t, store, "nova-api-1") }, 5*time.Second, 20*time.Millisecond)

	// Two processes of a new ID in one batch: one is kept, the other is
	// its rival.
	rec, err = store.RecordStatusBatch(ctx, []wire.Status{
		incarnationStatus("fresh", "inc-x", "host-x", 1, epoch),
		incarnationStatus("fresh", "inc-y", "host-y", 2, epoch),
	}, time.Minute)
	require.NoError(t, err)
	require.Len(t, rec.Kept, 1)
	require.Len(t, rec.Conflicts, 1)
	require.NotEqual(t, rec.Kept[0].Incarnation, rec.Conflicts[0].Incarnation)
	require.True(t, conflicted(t, store, "fresh"))
}
