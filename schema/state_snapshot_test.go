package schema_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/internal/wire"
	"github.com/phasecast/phasecast/schema"
)

// TestStateOneStatement checks State, a single statement, against the
// state SyncAgent reads in its transaction, from an empty store on, and
// that it never shows releases from another epoch while flips commit.
func TestStateOneStatement(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	store := testenv.Store(t)

	st, err := store.State(ctx)
	require.NoError(t, err)
	require.Equal(t, int64(0), st.Epoch)
	require.NotNil(t, st.Releases, "no release: an empty list, not null")
	require.Empty(t, st.Releases)

	for _, name := range []string{"B", "A"} {
		m, err := schema.ParseManifest("t.yaml", []byte("release: "+name+"\nremoved:\n  - table: nova.instances\n    columns: [x, y]\n  - table: legacy\n"))
		require.NoError(t, err)
		_, err = store.ApplyRelease(ctx, m, "test")
		require.NoError(t, err)
	}
	st, err = store.State(ctx)
	require.NoError(t, err)
	synced, err := store.SyncAgent(ctx, testenv.Credentials(wire.Status{V: wire.StatusVersion, Kind: wire.KindStatus, AgentID: "a", Service: "s", Seq: 1}), time.Second)
	require.NoError(t, err)
	require.Equal(t, synced, st)
	require.Equal(t, []wire.Release{
		{Name: "A", Phase: phase.Expand, Removals: []wire.Removal{{Table: "nova.instances", Columns: []string{"x", "y"}}, {Table: "legacy"}}},
		{Name: "B", Phase: phase.Expand, Removals: []wire.Removal{{Table: "nova.instances", Columns: []string{"x", "y"}}, {Table: "legacy"}}},
	}, st.Releases)

	// While A flips back and forth, every state read pairs the epoch with
	// the phase that epoch wrote: odd flips move to contract.
	_, err = store.Flip(ctx, "A", phase.Migrate, schema.FlipOptions{Actor: "test"})
	require.NoError(t, err)
	base, err := store.Epoch(ctx)
	require.NoError(t, err)
	done := make(chan struct{})
	go func() {
		defer close(done)
		to := phase.Contract
		for range 40 {
			_, err := store.Flip(ctx, "A", to, schema.FlipOptions{Actor: "test"})
			if err != nil {
				t.Error(err)
				return
			}
			to = map[phase.Phase]phase.Phase{phase.Contract: phase.Migrate, phase.Migrate: phase.Contract}[to]
		}
	}()
	for reads := 0; ; reads++ {
		select {
		case <-done:
			require.Positive(t, reads)
			return
		default:
		}
		st, err := store.State(ctx)
		require.NoError(t, err)
		want := phase.Migrate
		if (st.Epoch-base)%2 == 1 {
			want = phase.Contract
		}
		require.Equal(t, want, st.Releases[0].Phase, "epoch %d", st.Epoch)
	}
}
