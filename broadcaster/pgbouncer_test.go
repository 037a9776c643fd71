package broadcaster_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/broadcaster"
	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/schema"
)

// pooledConfig is a broadcaster config whose store (the leader lock), or
// LISTEN (Config.DatabaseURL), or both go through a PgBouncer of the
// test's own in mode.
func (tb *testBundle) pooledConfig(t *testing.T, mode string, store, listen bool) *broadcaster.Config {
	t.Helper()
	url := testenv.PgBouncer(t, mode)
	cfg := tb.config(t)
	if store {
		s, err := schema.Open(context.Background(), url, tb.store.Schema())
		require.NoError(t, err)
		t.Cleanup(func() { s.Close() })
		cfg.Store = s
	}
	if listen {
		cfg.DatabaseURL = url
	}
	return cfg
}

// TestLeaderRefusesThroughTransactionPooler: behind PgBouncer in
// transaction mode the leader lock and LISTEN do not stay on the
// broadcaster's session (it used to lose leadership every second and hear
// no NOTIFY, with no error), so it refuses to start, saying what to do.
func TestLeaderRefusesThroughTransactionPooler(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name          string
		store, listen bool
		what          string
	}{
		{"Store", true, false, "the leader lock"},
		{"Listen", false, true, "LISTEN"},
		{"Both", true, true, "LISTEN"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			bundle := setup(t)
			b, err := broadcaster.New(bundle.pooledConfig(t, testenv.PoolTransaction, tc.store, tc.listen))
			require.NoError(t, err)
			ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			defer cancel()
			err = b.Start(ctx)
			if err == nil {
				time.Sleep(2 * time.Second)
				takeovers := b.Stats().Takeovers
				_ = b.Stop(ctx)
				require.FailNow(t, "the broadcaster started behind a transaction pooler", "takeovers: %d", takeovers)
			}
			t.Log(err)
			require.ErrorIs(t, err, schema.ErrTransactionPooler)
			require.Contains(t, err.Error(), "session pooling")
			var perr *schema.PoolerError
			require.True(t, errors.As(err, &perr))
			require.Equal(t, tc.what, perr.What)
			require.False(t, b.IsLeader())
			rep, err := bundle.store.Report(ctx, 0)
			require.NoError(t, err)
			require.Empty(t, rep.Broadcasters, "a broadcaster that refused leaves no liveness row")
		})
	}
}

// TestLeaderThroughSessionPooler: through PgBouncer in session mode the
// broadcaster leads and keeps leading.
func TestLeaderThroughSessionPooler(t *testing.T) {
	t.Parallel()
	bundle := setup(t)
	cfg := bundle.pooledConfig(t, testenv.PoolSession, true, true)
	b := start(t, cfg)
	require.Eventually(t, b.IsLeader, 5*time.Second, 10*time.Millisecond)
	time.Sleep(10 * cfg.LivenessInterval)
	require.True(t, b.IsLeader())
	require.Equal(t, int64(1), b.Stats().Takeovers, "leadership held without a break")
}
