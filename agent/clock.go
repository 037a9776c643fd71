package agent

import "time"

// The lease deadline on a clock cheap enough for every Enter.
//
// The lease timer fences the agent when the deadline passes, but a timer
// is a goroutine: after the process was paused past its deadline (SIGSTOP,
// a frozen VM or container), a worker can reach Enter before the timer has
// run. So Enter compares a clock with the deadline itself. Reading the
// monotonic clock (time.Now, or runtime.nanotime) costs about 24 ns on the
// CI machine, twice what Enter and Exit cost together, so the deadline is
// also kept in ticks of a cheaper clock (Agent.leaseEnd): on amd64, when
// the kernel's clocksource is the CPU's time-stamp counter, that counter
// read directly (the kernel reads its monotonic clock from the same
// counter); elsewhere the monotonic clock itself. The tick clock only
// decides when Enter looks closer: a deadline it says has passed is
// checked against time.Now under leaseMu before anything is fenced, so an
// error in its rate costs a slow Enter, never a wrong fence. Were the
// counter to go wrong later (the kernel can give it up as a clocksource
// while the process runs), the worst is an Enter that misses a pause, as
// before this check: the lease timer and the fence flag still decide.

// clockBase is the origin of monoNanos.
var clockBase = time.Now()

// monoNanos reads the monotonic clock, in nanoseconds since clockBase.
func monoNanos() int64 { return int64(time.Since(clockBase)) }

// deadlineTicks converts a deadline to the tick clock. It errs early: a
// tick deadline that comes too soon costs a look at time.Now, one that
// comes too late would let a paused process hand out a guard.
func deadlineTicks(deadline time.Time) int64 {
	if !tscUsable {
		return int64(deadline.Sub(clockBase))
	}
	return tscDeadline(deadline)
}
