package broadcaster_test

import (
	"context"
	"encoding/json"
	"slices"
	"sort"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/broadcaster"
	"github.com/phasecast/phasecast/internal/amqpx"
	"github.com/phasecast/phasecast/internal/pgadmin"
	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/internal/wire"
)

// rawStatus is a status as JSON, written out field by field so the test
// says what is on the wire: fields overrides or adds to a well-formed
// heartbeat of agent id.
func rawStatus(t *testing.T, id string, fields map[string]any) []byte {
	t.Helper()
	m := map[string]any{
		"v": wire.StatusVersion, "kind": "status", "agent_id": id, "incarnation": "test-" + id,
		"token": testenv.Credentials(wire.Status{AgentID: id}).Token, "service": "nova-api", "host": "host-1", "pid": 4242,
		"version": "1.0", "releases": []string{"L"}, "seq": time.Now().UnixNano(),
		"applied_epoch": 0, "drained_epoch": 0, "inflight": 0, "sent_at": time.Now().UTC(),
	}
	for k, v := range fields {
		m[k] = v
	}
	body, err := json.Marshal(m)
	require.NoError(t, err)
	return body
}

// publishConfirmed publishes each body to the status queue and waits for
// the broker to confirm them, so they are in the queue before the test
// goes on.
func (tb *testBundle) publishConfirmed(t *testing.T, bodies ...[]byte) {
	t.Helper()
	ch, err := tb.conn.Channel()
	require.NoError(t, err)
	defer ch.Close()
	require.NoError(t, ch.Confirm(false))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, body := range bodies {
		dc, err := ch.PublishWithDeferredConfirmWithContext(ctx, "", amqpx.StatusQueue(tb.prefix), false, false, tb.publishing(t, body, nil))
		require.NoError(t, err)
		ok, err := dc.WaitContext(ctx)
		require.NoError(t, err)
		require.True(t, ok, "the broker nacked a status")
	}
}

func (tb *testBundle) agentIDs(t *testing.T) []string {
	t.Helper()
	agents, err := tb.store.Agents(context.Background())
	require.NoError(t, err)
	ids := make([]string, 0, len(agents))
	for _, a := range agents {
		ids = append(ids, a.ID)
	}
	sort.Strings(ids)
	return ids
}

// TestStatusesFromAnotherStoreOrRunAreNotApplied: the status queue is
// durable and named by the prefix alone, so it may still hold what an
// earlier run left in it: statuses of another store (the schema dropped
// and migrated again under the same prefix), goodbyes, agents long gone.
// A broadcaster on a freshly migrated store records none of them and
// counts each drop; a status of its own store older than its TTL (the
// lease) is dropped too; a current status of its own store is recorded
// and granted as ever.
func TestStatusesFromAnotherStoreOrRunAreNotApplied(t *testing.T) {
	t.Parallel()
	bundle := setup(t)
	storeID := bundle.storeID(t)
	require.NotEmpty(t, storeID)
	require.Empty(t, bundle.agentIDs(t), "a freshly migrated store has no agents")

	// (a) What an earlier run left in the queue, published before the
	// broadcaster starts.
	const earlier = "5d0c6f0e-8a4b-4f61-9b7e-2c1f3a9d8e70" // the earlier run's store
	long := time.Now().Add(-time.Hour).UTC()
	bundle.publishConfirmed(t,
		rawStatus(t, "earlier-heartbeat", map[string]any{"store_id": earlier}),
		rawStatus(t, "earlier-goodbye", map[string]any{"store_id": earlier, "leaving": true}),
		rawStatus(t, "earlier-gone", map[string]any{"store_id": earlier, "sent_at": long, "applied_epoch": 3, "drained_epoch": 3}),
		rawStatus(t, "earlier-unbound", nil), // an agent that names no store
	)
	cfg := bundle.config(t)
	cfg.LeaseDuration = 5 * time.Second // the TTL of (b)
	b := start(t, cfg)
	_, grants := bundle.replyQueue(t)
	// The sentinel comes after them in the queue: once it is recorded,
	// they have all been handled.
	bundle.publishConfirmed(t, rawStatus(t, "sentinel", map[string]any{"store_id": storeID}))
	require.Eventually(t, func() bool { return slices.Contains(bundle.agentIDs(t), "sentinel") }, 10*time.Second, 10*time.Millisecond)
	require.Equal(t, []string{"sentinel"}, bundle.agentIDs(t), "statuses of another store or run were recorded")
	require.EqualValues(t, 4, b.Stats().Rejected[broadcaster.RejectOtherStore], "each drop is counted")
	require.Equal(t, "sentinel", waitGrant(t, grants, nil, 10*time.Second).AgentID)

	// (b) Of this store, but sent longer ago than a lease: it asks for a
	// lease that would already have run out.
	stale := time.Now().Add(-2 * cfg.LeaseDuration).UTC()
	bundle.publishConfirmed(t, rawStatus(t, "expired", map[string]any{"store_id": storeID, "sent_at": stale}))
	require.Eventually(t, func() bool { return b.Stats().Rejected[broadcaster.RejectExpired] == 1 }, 10*time.Second, 10*time.Millisecond)
	require.Equal(t, []string{"sentinel"}, bundle.agentIDs(t), "an expired status was recorded")
	requireNoDelivery(t, grants, 200*time.Millisecond)

	// (c) The normal path: current statuses of this store are recorded
	// and granted.
	bundle.publishConfirmed(t, rawStatus(t, "current", map[string]any{"store_id": storeID}))
	require.Equal(t, "current", waitGrant(t, grants, nil, 10*time.Second).AgentID)
	require.Equal(t, []string{"current", "sentinel"}, bundle.agentIDs(t))
	stats := b.Stats()
	require.EqualValues(t, 2, stats.StatusesRecorded)
	require.EqualValues(t, 4, stats.Rejected[broadcaster.RejectOtherStore])
	require.EqualValues(t, 1, stats.Rejected[broadcaster.RejectExpired])
}

// A store dropped and migrated again under a running broadcaster is
// another store: the broadcaster's states name the new one within a
// beacon, and from then on it records the new store's statuses and drops
// the old one's.
func TestStoreMigratedAgainUnderARunningBroadcaster(t *testing.T) {
	t.Parallel()
	bundle := setup(t)
	states := bundle.stateConsumer(t)
	b := start(t, bundle.config(t))
	old := bundle.storeID(t)

	// The drop may deadlock with the broadcaster's own writes (the
	// liveness row, a status batch); the server then aborts it: again.
	require.Eventually(t, func() bool {
		return pgadmin.DropSchemas(context.Background(), bundle.store.DB(), bundle.store.Schema()) == nil
	}, 10*time.Second, 50*time.Millisecond)
	_, err := bundle.store.Migrate(context.Background())
	require.NoError(t, err)
	testenv.AllowTestPrincipals(t, bundle.store)
	renewed := bundle.storeID(t)
	require.NotEqual(t, old, renewed)
	waitState(t, states, nil, 10*time.Second, func(st wire.State) bool { return st.StoreID == renewed })

	_, grants := bundle.replyQueue(t)
	bundle.publishConfirmed(t,
		rawStatus(t, "of-the-old-store", map[string]any{"store_id": old}),
		rawStatus(t, "of-the-new-store", map[string]any{"store_id": renewed}))
	require.Equal(t, "of-the-new-store", waitGrant(t, grants, nil, 10*time.Second).AgentID)
	require.Equal(t, []string{"of-the-new-store"}, bundle.agentIDs(t))
	require.EqualValues(t, 1, b.Stats().Rejected[broadcaster.RejectOtherStore])
}
