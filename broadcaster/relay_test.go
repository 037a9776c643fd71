package broadcaster_test

import (
	"crypto/ed25519"
	"crypto/rand"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/wire"
)

// never is an interval long enough not to fire during a test, to show that
// something else did the work.
const never = time.Hour

func TestRelay(t *testing.T) {
	t.Parallel()

	t.Run("PublishesFlipAndMarksOutbox", func(t *testing.T) {
		t.Parallel()
		bundle := setup(t)
		states := bundle.stateConsumer(t)
		pub, priv, err := ed25519.GenerateKey(rand.Reader)
		require.NoError(t, err)
		cfg := bundle.config(t)
		cfg.SigningKey = priv
		cfg.BeaconInterval, cfg.PollInterval = never, never // NOTIFY alone must do it
		b := start(t, cfg)
		require.True(t, b.IsLeader())

		applyRelease(t, bundle.store, "L")
		epoch := flip(t, bundle.store, "L", phase.Migrate)
		st := waitState(t, states, pub, 10*time.Second, func(s wire.State) bool { return s.Epoch == epoch })
		require.Len(t, st.Releases, 1)
		require.Equal(t, "L", st.Releases[0].Name)
		require.Equal(t, phase.Migrate, st.Releases[0].Phase)
		require.Equal(t, []wire.Removal{{Table: "instances", Columns: []string{"name"}}}, st.Releases[0].Removals)

		require.Eventually(t, func() bool { return unpublishedRows(t, bundle.store) == 0 }, 5*time.Second, 20*time.Millisecond,
			"every event row gets published_at once the broker confirmed")
		require.GreaterOrEqual(t, b.Stats().StatesPublished, int64(1))
	})

	t.Run("PublishesFlipMadeWhileDown", func(t *testing.T) {
		t.Parallel()
		bundle := setup(t)
		states := bundle.stateConsumer(t)
		applyRelease(t, bundle.store, "L")
		flip(t, bundle.store, "L", phase.Migrate)
		epoch := flip(t, bundle.store, "L", phase.Contract)
		require.Equal(t, 3, unpublishedRows(t, bundle.store))

		cfg := bundle.config(t)
		cfg.BeaconInterval, cfg.PollInterval = never, never // leadership start alone must do it
		start(t, cfg)
		st := waitState(t, states, nil, 10*time.Second, func(s wire.State) bool { return s.Epoch == epoch })
		require.Equal(t, phase.Contract, st.Releases[0].Phase)
		require.Eventually(t, func() bool { return unpublishedRows(t, bundle.store) == 0 }, 5*time.Second, 20*time.Millisecond)
	})

	t.Run("CoalescesNotifyBurst", func(t *testing.T) {
		t.Parallel()
		bundle := setup(t)
		cfg := bundle.config(t)
		cfg.BeaconInterval, cfg.PollInterval = never, never
		b := start(t, cfg)
		require.Eventually(t, func() bool { return b.Stats().StatesPublished == 1 }, 10*time.Second, 10*time.Millisecond, "the start relay")
		// Wait until the listener is up: a notification sent before it is
		// lost (the poll would cover that; it is off here).
		require.Eventually(t, func() bool { return listening(t, bundle) }, 10*time.Second, 10*time.Millisecond)

		// 50 notifications with distinct payloads that name no epoch, all
		// delivered at once when the statement commits.
		_, err := bundle.store.DB().Exec(`SELECT pg_notify($1, 'burst-' || i) FROM generate_series(1, 50) AS i`, bundle.store.NotifyChannel())
		require.NoError(t, err)
		require.Eventually(t, func() bool { return b.Stats().StatesPublished > 1 }, 5*time.Second, 10*time.Millisecond)
		time.Sleep(500 * time.Millisecond)
		published := b.Stats().StatesPublished - 1
		require.LessOrEqual(t, published, int64(5), "a burst of 50 notifications coalesces into a few publishes")

		// A notification naming an epoch already published relays nothing.
		_, err = bundle.store.DB().Exec(`SELECT pg_notify($1, '0')`, bundle.store.NotifyChannel())
		require.NoError(t, err)
		time.Sleep(300 * time.Millisecond)
		require.Equal(t, published+1, b.Stats().StatesPublished)
	})

	t.Run("Beacons", func(t *testing.T) {
		t.Parallel()
		bundle := setup(t)
		states := bundle.stateConsumer(t)
		applyRelease(t, bundle.store, "L")
		cfg := bundle.config(t)
		cfg.BeaconInterval = 100 * time.Millisecond
		b := start(t, cfg)
		for range 4 {
			waitState(t, states, nil, 5*time.Second, func(s wire.State) bool { return s.Epoch == 1 })
		}
		require.GreaterOrEqual(t, b.Stats().BeaconsPublished, int64(2))
	})

	t.Run("RelaysAfterListenConnectionKilled", func(t *testing.T) {
		t.Parallel()
		bundle := setup(t)
		states := bundle.stateConsumer(t)
		applyRelease(t, bundle.store, "L")
		cfg := bundle.config(t)
		cfg.BeaconInterval, cfg.PollInterval = never, never
		start(t, cfg)
		waitState(t, states, nil, 10*time.Second, func(s wire.State) bool { return s.Epoch == 1 })
		require.Eventually(t, func() bool { return listening(t, bundle) }, 10*time.Second, 10*time.Millisecond)

		var pid int
		require.NoError(t, bundle.store.DB().Get(&pid, `SELECT pid FROM pg_stat_activity WHERE query = $1`, listenQuery(bundle)))
		terminate(t, bundle.store, pid)
		// Whether this flip's NOTIFY reaches the new connection or is lost
		// with the old one, the reconnect forces a relay of the whole state.
		epoch := flip(t, bundle.store, "L", phase.Migrate)
		waitState(t, states, nil, 10*time.Second, func(s wire.State) bool { return s.Epoch == epoch })
	})

	t.Run("PollCatchesLostNotification", func(t *testing.T) {
		t.Parallel()
		bundle := setup(t)
		states := bundle.stateConsumer(t)
		cfg := bundle.config(t)
		cfg.BeaconInterval = never
		b := start(t, cfg)
		require.Eventually(t, func() bool { return b.Stats().StatesPublished == 1 }, 10*time.Second, 10*time.Millisecond)
		// An outbox row whose NOTIFY never came: written by hand, without
		// pg_notify, as if the notification was lost.
		_, err := bundle.store.DB().Exec(`WITH e AS (UPDATE ` + quoted(bundle) + `.epoch SET value = value + 1 RETURNING value)
			INSERT INTO ` + quoted(bundle) + `.events (epoch, release, to_phase) SELECT value, 'ghost', 'expand' FROM e`)
		require.NoError(t, err)
		require.Eventually(t, func() bool { return unpublishedRows(t, bundle.store) == 0 }, 5*time.Second, 20*time.Millisecond)
		waitState(t, states, nil, 5*time.Second, func(s wire.State) bool { return s.Epoch == 1 })
		require.Zero(t, b.Stats().BeaconsPublished)
	})
}

// listenQuery is the statement lib/pq's Listener ran on its connection.
func listenQuery(tb *testBundle) string {
	return `LISTEN "` + tb.store.NotifyChannel() + `"`
}

func listening(t *testing.T, tb *testBundle) bool {
	t.Helper()
	var n int
	require.NoError(t, tb.store.DB().Get(&n, `SELECT count(*) FROM pg_stat_activity WHERE query = $1 AND state = 'idle'`, listenQuery(tb)))
	return n == 1
}

func quoted(tb *testBundle) string { return `"` + tb.store.Schema() + `"` }
