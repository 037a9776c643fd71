//go:build !amd64

package agent

import "time"

// Off amd64 the tick clock is the monotonic clock.
const tscUsable = false

func ticks() int64 { return monoNanos() }

func calibrateClock() {}

func tscDeadline(time.Time) int64 { panic("agent: no time-stamp counter on this architecture") }
