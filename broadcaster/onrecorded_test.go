package broadcaster_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/lib/pq"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/broadcaster"
)

// TestOnRecorded checks that the hook sees each recorded status once its
// batch has committed, and that a lone status is not held for the whole
// StatusBatchWait: the batch closes after StatusBatchGap of quiet.
func TestOnRecorded(t *testing.T) {
	t.Parallel()
	bundle := setup(t)
	epoch := applyRelease(t, bundle.store, "L")
	var mu sync.Mutex
	var got []broadcaster.RecordedStatus
	var at []time.Time
	cfg := bundle.config(t)
	cfg.StatusBatchWait = 2 * time.Second // only the gap can close the batch quickly
	cfg.StatusBatchGap = 20 * time.Millisecond
	cfg.OnRecorded = func(when time.Time, rs []broadcaster.RecordedStatus) {
		mu.Lock()
		defer mu.Unlock()
		got = append(got, rs...)
		at = append(at, when)
	}
	require.Equal(t, 5*time.Millisecond/5, (&broadcaster.Config{}).WithDefaults().StatusBatchGap, "the gap defaults to StatusBatchWait/5")
	start(t, cfg)
	_, grants := bundle.replyQueue(t)

	st := status("agent-1", 7)
	st.AppliedEpoch, st.DrainedEpoch = epoch, epoch
	sent := time.Now()
	bundle.sendStatus(t, st, nil)
	waitGrant(t, grants, nil, 10*time.Second)
	mu.Lock()
	defer mu.Unlock()
	require.Equal(t, []broadcaster.RecordedStatus{{AgentID: "agent-1", Seq: 7, AppliedEpoch: epoch, DrainedEpoch: epoch}}, got)
	require.Len(t, at, 1)
	require.Less(t, at[0].Sub(sent), time.Second, "recorded after the gap, not after StatusBatchWait")

	// A replay is not recorded, so the hook does not see it.
	bundle.sendStatus(t, st, nil)
	mu.Unlock()
	time.Sleep(300 * time.Millisecond)
	mu.Lock()
	require.Len(t, got, 1)
}

// TestStatusesArrivingDuringARecordFollowItAtOnce: the statuses that
// arrive while a batch is being recorded form the next batch meanwhile,
// and it is recorded the moment the first one commits, not a
// StatusBatchGap later. A transaction holding the epoch row keeps the
// first record waiting, as a slow database would.
func TestStatusesArrivingDuringARecordFollowItAtOnce(t *testing.T) {
	t.Parallel()
	bundle := setup(t)
	epoch := applyRelease(t, bundle.store, "L")
	var mu sync.Mutex
	recordedAt := map[string]time.Time{}
	cfg := bundle.config(t)
	cfg.StatusBatchWait = 5 * time.Second
	cfg.StatusBatchGap = 300 * time.Millisecond
	cfg.OnRecorded = func(when time.Time, rs []broadcaster.RecordedStatus) {
		mu.Lock()
		defer mu.Unlock()
		for _, r := range rs {
			recordedAt[r.AgentID] = when
		}
	}
	start(t, cfg)
	_, grants := bundle.replyQueue(t)

	ctx := context.Background()
	hold, err := bundle.store.DB().BeginTx(ctx, nil)
	require.NoError(t, err)
	defer func() { _ = hold.Rollback() }()
	_, err = hold.ExecContext(ctx, "SELECT value FROM "+pq.QuoteIdentifier(bundle.store.Schema())+".epoch FOR UPDATE")
	require.NoError(t, err)

	first, second := status("agent-1", 7), status("agent-2", 7)
	first.AppliedEpoch, first.DrainedEpoch = epoch, epoch
	second.AppliedEpoch, second.DrainedEpoch = epoch, epoch
	bundle.sendStatus(t, first, nil)
	time.Sleep(2 * cfg.StatusBatchGap) // the first batch closed: its record waits for the lock
	bundle.sendStatus(t, second, nil)
	time.Sleep(2 * cfg.StatusBatchGap) // the second batch closed too, behind the record
	released := time.Now()
	require.NoError(t, hold.Rollback())

	waitGrant(t, grants, nil, 10*time.Second)
	waitGrant(t, grants, nil, 10*time.Second)
	mu.Lock()
	defer mu.Unlock()
	require.Contains(t, recordedAt, "agent-1")
	require.Contains(t, recordedAt, "agent-2")
	require.False(t, recordedAt["agent-2"].Before(recordedAt["agent-1"]), "recorded in order")
	require.Less(t, recordedAt["agent-2"].Sub(released), cfg.StatusBatchGap/2,
		"the second batch waited for a gap of its own after the first record")
}
