package broadcaster_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/broadcaster"
	"github.com/phasecast/phasecast/internal/testenv"
)

// TestNoGrantForASecondProcessUnderOneID: a status from a second live
// process (another incarnation) under an agent ID is not recorded and
// earns no grant, so its sender stays fenced, while the holder's statuses
// are still granted; both processes are in the store for status to show.
func TestNoGrantForASecondProcessUnderOneID(t *testing.T) {
	t.Parallel()
	bundle := setup(t)
	b := start(t, bundle.config(t))
	// Both processes bind their queues under the one ID, so both see its
	// grants: each grant names the incarnation it is for.
	_, grants := bundle.replyQueue(t)

	holder := status("nova-api-1", 10)
	holder.Incarnation, holder.Host = "inc-holder", "host-a"
	holder = testenv.Credentials(holder)
	bundle.sendStatus(t, holder, nil)
	g := waitGrant(t, grants, nil, 10*time.Second)
	require.Equal(t, uint64(10), g.Seq)
	require.Equal(t, "inc-holder", g.Incarnation)

	// The rival's seq is far higher: it must not matter.
	rival := status("nova-api-1", 1<<60)
	rival.Incarnation, rival.Host = "inc-rival", "host-b"
	rival = testenv.Credentials(rival)
	bundle.sendStatus(t, rival, nil)
	require.Eventually(t, func() bool { return b.Stats().Rejected[broadcaster.RejectIDConflict] == 1 }, 10*time.Second, 10*time.Millisecond)
	requireNoDelivery(t, grants, 300*time.Millisecond)

	holder.Seq = 11
	bundle.sendStatus(t, holder, nil)
	g = waitGrant(t, grants, nil, 10*time.Second)
	require.Equal(t, uint64(11), g.Seq)
	require.Equal(t, "inc-holder", g.Incarnation)

	agents, err := bundle.store.Agents(t.Context())
	require.NoError(t, err)
	require.Len(t, agents, 1)
	require.Equal(t, "inc-holder", agents[0].Incarnation)
	require.Equal(t, "host-a", agents[0].Host)
	require.Len(t, agents[0].Rivals, 1)
	require.Equal(t, "host-b", agents[0].Rivals[0].Host)
	require.Zero(t, b.Stats().Rejected[broadcaster.RejectStaleSeq])
}
