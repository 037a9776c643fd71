package agent

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestEnterFencesPastTheDeadlineWithoutTheTimer: after a pause longer than
// the lease (SIGSTOP, a frozen VM or container), a worker can reach Enter
// before the lease timer has run. Enter must see the deadline has passed
// by itself. The pause is simulated by stopping the timer from fencing and
// letting the deadline pass with no grant coming.
func TestEnterFencesPastTheDeadlineWithoutTheTimer(t *testing.T) {
	t.Parallel()
	for _, withDB := range []bool{false, true} {
		name := map[bool]string{false: "WithoutDB", true: "WithDB"}[withDB]
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			b := setup(t, fakeOptions{lease: 600 * time.Millisecond})
			applyRelease(t, b.store, manifestL)
			cfg := b.config(t, withDB)
			cfg.HeartbeatInterval = time.Minute // nothing renews the lease behind the test's back
			cfg.InitialLease = 600 * time.Millisecond
			a := startAgent(t, cfg)
			g, err := a.Enter()
			require.NoError(t, err)
			g.Exit()

			a.hooks.leaseTimerStopped.Store(true)
			b.fake.answering.Store(false)
			require.Eventually(t, func() bool { return a.Stats().LeaseRemaining < -50*time.Millisecond }, 5*time.Second, 5*time.Millisecond)
			st := a.Stats()
			require.False(t, st.Fenced, "the timer has not fenced (the simulated pause)")
			r0 := st.Resyncs

			g, err = a.Enter()
			if withDB {
				// A fenced Enter with a DB re-syncs: the guard is on the
				// store's state and the lease is renewed there.
				require.NoError(t, err)
				g.Exit()
				st = a.Stats()
				require.Equal(t, r0+1, st.Resyncs, "Enter past the deadline re-synced from the store")
				require.Positive(t, st.LeaseRemaining)
			} else {
				if err == nil {
					g.Exit()
				}
				require.ErrorIs(t, err, ErrStale, "Enter handed out a guard past the lease deadline")
				st = a.Stats()
				require.True(t, st.Fenced)
				require.Equal(t, int64(1), st.StaleRefusals)
			}
			require.Equal(t, int64(1), st.Fencings, "Enter fenced the agent itself")

			a.hooks.leaseTimerStopped.Store(false)
			b.fake.answering.Store(true)
			poke(a.leasePoke)
		})
	}
}

// TestTickDeadlineComesEarly: the deadline Enter reads on the tick clock
// passes no later than the monotonic one (a late one would let a paused
// process hand out a guard), and not much earlier (each Enter past it
// looks at time.Now). Each check reads the clock under test after the
// other one, so a preemption in between can only make it pass later.
func TestTickDeadlineComesEarly(t *testing.T) {
	t.Parallel()
	calibrateClock()
	t.Logf("tick clock: time-stamp counter %v", tscUsable)
	passed := deadlineTicks(time.Now().Add(-time.Millisecond))
	require.GreaterOrEqual(t, ticks(), passed, "a deadline passed already")
	for _, d := range []time.Duration{20 * time.Millisecond, 300 * time.Millisecond} {
		deadline := time.Now().Add(d)
		end := deadlineTicks(deadline)
		for ticks() < end {
			time.Sleep(50 * time.Microsecond)
		}
		require.False(t, time.Now().Before(deadline.Add(-d/100-time.Millisecond)), "the tick deadline for %s passed more than 1%% early", d)

		deadline = time.Now().Add(d)
		end = deadlineTicks(deadline)
		time.Sleep(time.Until(deadline))
		for time.Now().Before(deadline) {
			time.Sleep(50 * time.Microsecond)
		}
		require.GreaterOrEqual(t, ticks(), end, "the tick deadline for %s passed after the monotonic one", d)
	}
}
