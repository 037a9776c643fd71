package broadcaster_test

import (
	"sync"
	"testing"
	"time"

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
