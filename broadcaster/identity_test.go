package broadcaster_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/broadcaster"
)

// TestNoGrantForASecondProcessUnderOneID: a status from a second live
// process (another incarnation) under an agent ID is not recorded and
// earns no grant, so its sender stays fenced, while the holder's statuses
// are still granted; both processes are in the store for status to show.
func TestNoGrantForASecondProcessUnderOneID(t *testing.T) {
	t.Parallel()
	bundle := setup(t)
	b := start(t, bundle.config(t))
	holderQueue, holderGrants := bundle.replyQueue(t)
	rivalQueue, rivalGrants := bundle.replyQueue(t)

	holder := status("nova-api-1", 10, holderQueue)
	holder.Incarnation, holder.Host = "inc-holder", "host-a"
	bundle.sendStatus(t, holder, nil)
	require.Equal(t, uint64(10), waitGrant(t, holderGrants, nil, 10*time.Second).Seq)

	// The rival's seq is far higher: it must not matter.
	rival := status("nova-api-1", 1<<60, rivalQueue)
	rival.Incarnation, rival.Host = "inc-rival", "host-b"
	bundle.sendStatus(t, rival, nil)
	require.Eventually(t, func() bool { return b.Stats().Rejected[broadcaster.RejectIDConflict] == 1 }, 10*time.Second, 10*time.Millisecond)
	requireNoDelivery(t, rivalGrants, 300*time.Millisecond)

	holder.Seq = 11
	bundle.sendStatus(t, holder, nil)
	require.Equal(t, uint64(11), waitGrant(t, holderGrants, nil, 10*time.Second).Seq)

	agents, err := bundle.store.Agents(t.Context())
	require.NoError(t, err)
	require.Len(t, agents, 1)
	require.Equal(t, "inc-holder", agents[0].Incarnation)
	require.Equal(t, "host-a", agents[0].Host)
	require.Len(t, agents[0].Rivals, 1)
	require.Equal(t, "host-b", agents[0].Rivals[0].Host)
	require.Zero(t, b.Stats().Rejected[broadcaster.RejectStaleSeq])
}
