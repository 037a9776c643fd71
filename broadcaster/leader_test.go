package broadcaster_test

import (
	"context"
	"net/url"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/broadcaster"
	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/internal/wire"
	"github.com/phasecast/phasecast/schema"
)

func TestLeadership(t *testing.T) {
	t.Parallel()
	ctx := context.Background()

	// leaders returns which of bs lead.
	leaders := func(bs ...*broadcaster.Broadcaster) []string {
		var ids []string
		for _, b := range bs {
			if b.IsLeader() {
				ids = append(ids, b.ID())
			}
		}
		return ids
	}

	t.Run("OneLeaderAndTakeoverOnStop", func(t *testing.T) {
		t.Parallel()
		bundle := setup(t)
		states := bundle.stateConsumer(t)
		applyRelease(t, bundle.store, "L")
		cfgA, cfgB := bundle.config(t), bundle.config(t)
		cfgA.ID, cfgB.ID = "bcast-a", "bcast-b"
		a := start(t, cfgA)
		b := start(t, cfgB)
		require.Equal(t, []string{"bcast-a"}, leaders(a, b))

		// The standby keeps trying and keeps failing while a leads, and
		// both show in the liveness table.
		time.Sleep(3 * cfgB.LivenessInterval)
		require.Equal(t, []string{"bcast-a"}, leaders(a, b))
		require.Eventually(t, func() bool {
			rep, err := bundle.store.Report(ctx, 0)
			require.NoError(t, err)
			return len(rep.Broadcasters) == 2 && rep.Broadcasters[0].ID == "bcast-a" && rep.Broadcasters[0].Leader && !rep.Broadcasters[1].Leader
		}, 5*time.Second, 20*time.Millisecond)

		stopped := time.Now()
		require.NoError(t, a.Stop(ctx))
		require.Eventually(t, b.IsLeader, 3*time.Second, 10*time.Millisecond, "the standby takes over")
		t.Logf("took over %s after Stop returned", time.Since(stopped).Round(time.Millisecond))
		require.Equal(t, int64(1), b.Stats().Takeovers)

		// The new leader relays.
		epoch := flip(t, bundle.store, "L", phase.Migrate)
		waitState(t, states, nil, 10*time.Second, func(s wire.State) bool { return s.Epoch == epoch })
		rep, err := bundle.store.Report(ctx, 0)
		require.NoError(t, err)
		require.Len(t, rep.Broadcasters, 1, "a stopped broadcaster removes its row")
	})

	t.Run("TakeoverWhenLockConnectionKilled", func(t *testing.T) {
		t.Parallel()
		bundle := setup(t)
		cfgA, cfgB := bundle.config(t), bundle.config(t)
		cfgA.ID, cfgB.ID = "bcast-a", "bcast-b"
		a := start(t, cfgA)
		b := start(t, cfgB)
		require.Equal(t, []string{"bcast-a"}, leaders(a, b))

		pid := lockHolder(t, bundle.store)
		require.NotZero(t, pid)
		killed := time.Now()
		terminate(t, bundle.store, pid)
		require.Eventually(t, func() bool { return b.IsLeader() && !a.IsLeader() }, 5*time.Second, 10*time.Millisecond,
			"the standby takes over from a leader whose lock connection died")
		t.Logf("took over %s after the kill", time.Since(killed).Round(time.Millisecond))
		holder := lockHolder(t, bundle.store)
		require.NotZero(t, holder)
		require.NotEqual(t, pid, holder)

		// The old leader stands by and does not take the lock back.
		time.Sleep(5 * cfgA.LivenessInterval)
		require.Equal(t, []string{"bcast-b"}, leaders(a, b))
		require.Equal(t, int64(1), a.Stats().Takeovers)
		require.Equal(t, int64(1), b.Stats().Takeovers)
	})

	t.Run("SurvivesEveryConnectionKilled", func(t *testing.T) {
		t.Parallel()
		bundle := setup(t)
		states := bundle.stateConsumer(t)
		applyRelease(t, bundle.store, "L")
		// The broadcaster's own pool and LISTEN connection, marked with an
		// application_name so that the test kills those sessions and no
		// other test's.
		appName := testenv.Name("pct_victim")
		dbURL := withAppName(t, testenv.DatabaseURL(), appName)
		db, err := sqlx.Open("postgres", dbURL)
		require.NoError(t, err)
		t.Cleanup(func() { _ = db.Close() })
		store, err := schema.NewStore(db, bundle.store.Schema())
		require.NoError(t, err)
		cfg := bundle.config(t)
		cfg.Store, cfg.DatabaseURL = store, dbURL
		cfg.BeaconInterval = never
		b := start(t, cfg)
		_, grants := bundle.replyQueue(t)
		bundle.sendStatus(t, status("agent-1", 1), nil)
		waitGrant(t, grants, nil, 10*time.Second)
		require.Eventually(t, func() bool { return listening(t, bundle) }, 10*time.Second, 10*time.Millisecond)

		var killed []bool
		require.NoError(t, bundle.store.DB().Select(&killed, `SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1`, appName))
		require.GreaterOrEqual(t, len(killed), 2, "at least the lock and the LISTEN connections")

		// It loses the lock with its connection and takes it again (it is
		// the only broadcaster), then relays and records as before.
		require.Eventually(t, func() bool { return b.IsLeader() && b.Stats().Takeovers == 2 }, 10*time.Second, 10*time.Millisecond)
		epoch := flip(t, bundle.store, "L", phase.Migrate)
		waitState(t, states, nil, 10*time.Second, func(s wire.State) bool { return s.Epoch == epoch })
		require.Eventually(t, func() bool { return unpublishedRows(t, bundle.store) == 0 }, 10*time.Second, 20*time.Millisecond)
		bundle.sendStatus(t, status("agent-1", 2), nil)
		g := waitGrant(t, grants, nil, 10*time.Second)
		require.Equal(t, uint64(2), g.Seq)
		require.Equal(t, epoch, g.Epoch)
	})
}

// withAppName sets application_name on a postgres:// URL.
func withAppName(t *testing.T, dbURL, name string) string {
	t.Helper()
	u, err := url.Parse(dbURL)
	require.NoError(t, err)
	q := u.Query()
	q.Set("application_name", name)
	u.RawQuery = q.Encode()
	return u.String()
}
