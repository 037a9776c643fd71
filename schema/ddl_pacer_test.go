package schema

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestLockPacerLengthensOnlyForAStream: one long transaction holds the
// DROP off for good and never lengthens its lock_timeout; old holders that
// keep ending, or tries that keep timing out, double it up to the ceiling.
func TestLockPacerLengthensOnlyForAStream(t *testing.T) {
	t0 := time.Now()
	holder := func(pid int, age time.Duration) LockHolder {
		return LockHolder{PID: pid, Age: age, xactStart: t0.Add(time.Duration(pid) * time.Second)}
	}

	t.Run("LongTransaction", func(t *testing.T) {
		p := newLockPacer(50 * time.Millisecond)
		for i := 1; i <= 1000; i++ {
			hold, holdOff, longer := p.look([]LockHolder{holder(1, time.Duration(i)*time.Second), holder(100+i, time.Millisecond)})
			require.True(t, holdOff)
			require.False(t, longer)
			require.Equal(t, 1, hold.PID)
		}
		require.Equal(t, 50*time.Millisecond, p.lockTimeout)
		_, holdOff, _ := p.look([]LockHolder{holder(7, 10*time.Millisecond)})
		require.False(t, holdOff, "only a young holder")
		_, holdOff, _ = p.look([]LockHolder{{PID: 0, Age: -1}})
		require.True(t, holdOff, "a prepared transaction is old")
	})

	t.Run("StreamOfLongerTransactions", func(t *testing.T) {
		p := newLockPacer(50 * time.Millisecond)
		var got []time.Duration
		for pid := 1; pid < 60; pid++ {
			// Each look sees a new 120ms transaction and the last one gone.
			_, _, longer := p.look([]LockHolder{holder(pid, 120*time.Millisecond)})
			if longer {
				got = append(got, p.lockTimeout)
			}
		}
		require.Equal(t, []time.Duration{100 * time.Millisecond, 200 * time.Millisecond}, got)
		_, holdOff, _ := p.look([]LockHolder{holder(99, 120*time.Millisecond)})
		require.False(t, holdOff, "120ms transactions are young at a 200ms lock_timeout")
	})

	t.Run("TimedOutTries", func(t *testing.T) {
		p := newLockPacer(50 * time.Millisecond)
		for range starveTries - 1 {
			require.False(t, p.timedOut())
		}
		require.True(t, p.timedOut())
		require.Equal(t, 100*time.Millisecond, p.lockTimeout)
		p.look([]LockHolder{holder(1, time.Second)}) // held off: the count starts again
		for range starveTries - 1 {
			require.False(t, p.timedOut())
		}
		for range 10 * starveTries {
			p.timedOut()
		}
		require.Equal(t, lockTimeoutCeiling, p.lockTimeout, "doubling stops at the ceiling")
	})

	t.Run("CeilingNotBelowLockTimeout", func(t *testing.T) {
		p := newLockPacer(5 * time.Second)
		for range starveTries {
			require.False(t, p.timedOut())
		}
		require.Equal(t, 5*time.Second, p.lockTimeout)
	})
}
