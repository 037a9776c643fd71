package agent

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/wire"
)

// startInBackground creates an agent and starts it on a goroutine of its
// own, for tests that act while Start waits; the channel yields what Start
// returned.
func startInBackground(t *testing.T, cfg Config) (*Agent, <-chan error) {
	t.Helper()
	a, err := New(cfg)
	require.NoError(t, err)
	started := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		started <- a.Start(ctx)
	}()
	t.Cleanup(func() { stopAgent(t, a) })
	return a, started
}

// TestStatusesNameTheStore: every status an agent sends names the store it
// belongs to and expires after a lease. An agent with a DB reads the store
// id from the store; one without learns it from the states and sends no
// status before its first state, which costs its start-up nothing.
func TestStatusesNameTheStore(t *testing.T) {
	t.Parallel()
	ctx := context.Background()

	requireNamed := func(t *testing.T, b *bundle, id string) {
		t.Helper()
		all := b.fake.received()
		require.NotEmpty(t, all)
		for _, s := range all {
			require.Equal(t, id, s.StoreID, "status seq %d", s.Seq)
			require.Equal(t, "2000", s.expiration, "the lease, in ms")
		}
	}

	t.Run("WithDB", func(t *testing.T) {
		t.Parallel()
		b := setup(t, fakeOptions{})
		id, err := b.store.ID(ctx)
		require.NoError(t, err)
		a := startAgent(t, b.config(t, true))
		require.Equal(t, id, a.Stats().StoreID)
		e := applyRelease(t, b.store, manifestL)
		b.fake.waitStatus(t, 0, 10*time.Second, func(s wire.Status) bool { return s.DrainedEpoch == e })
		requireNamed(t, b, id)
	})

	t.Run("WithoutDBWaitsForTheFirstState", func(t *testing.T) {
		t.Parallel()
		b := setup(t, fakeOptions{noBeacons: true})
		id, err := b.store.ID(ctx)
		require.NoError(t, err)
		a, started := startInBackground(t, b.config(t, false))
		// Connected, but holding no state: it says nothing.
		time.Sleep(500 * time.Millisecond)
		require.Empty(t, b.fake.received(), "a status before the first state names no store")
		require.Empty(t, a.Stats().StoreID)

		on := time.Now()
		b.fake.setBeacons(true)
		require.NoError(t, <-started)
		require.Less(t, time.Since(on), 2*time.Second, "start-up waits for one beacon and one grant")
		require.Equal(t, id, a.Stats().StoreID)
		requireNamed(t, b, id)
	})

	t.Run("WithoutDBLearnsTheStoreFromABeaconOfTheEpochItHolds", func(t *testing.T) {
		t.Parallel()
		// A broadcaster that predates store ids sends states without one;
		// after its upgrade, the beacons of the same epoch name the store.
		b := setup(t, fakeOptions{noBeacons: true})
		id, err := b.store.ID(ctx)
		require.NoError(t, err)
		st, err := b.store.State(ctx)
		require.NoError(t, err)
		st.StoreID = ""
		a, started := startInBackground(t, b.config(t, false))
		require.Eventually(t, func() bool {
			b.fake.publishState(st)
			return a.Stats().AppliedEpoch == st.Epoch
		}, 10*time.Second, 50*time.Millisecond)
		require.NoError(t, <-started)
		require.Empty(t, a.Stats().StoreID)
		require.Empty(t, b.fake.lastStatus(t).StoreID, "it names no store while it knows none")

		b.fake.publishNow() // the same epoch, naming the store
		require.Eventually(t, func() bool { return a.Stats().StoreID == id }, 10*time.Second, 5*time.Millisecond)
		from := len(b.fake.received())
		b.fake.waitStatus(t, from, 10*time.Second, func(s wire.Status) bool { return s.StoreID == id })
	})
}
