package agent

import (
	"os"
	"strings"
	"sync"
	"time"
)

// rdtsc reads the CPU's time-stamp counter (clock_amd64.s).
func rdtsc() int64

// tscUsable: the kernel keeps its monotonic clock on the time-stamp
// counter, so it found the counter constant-rate, running in every
// power state and in step across CPUs. Otherwise (another clocksource, no
// /sys to ask) the tick clock is the monotonic clock.
var tscUsable = tscIsClocksource()

func tscIsClocksource() bool {
	b, err := os.ReadFile("/sys/devices/system/clocksource/clocksource0/current_clocksource")
	return err == nil && strings.TrimSpace(string(b)) == "tsc"
}

// ticks reads the tick clock: a function value chosen once, so that
// Enter pays one call for it.
var ticks = pickTicks()

func pickTicks() func() int64 {
	if tscUsable {
		return rdtsc
	}
	return monoNanos
}

// The counter's rate is measured against the monotonic clock from a first
// sample taken when the package loads to the sample each conversion takes:
// the longer the process runs, the finer. tscSlack lowers it (so tick
// deadlines come early) by more than the error of that measurement after
// calibrateClock's minimum span, and more than NTP's slew of the
// monotonic clock (at most 500 ppm).
const (
	tscMinSpan   = 20 * time.Millisecond
	tscSlack     = 1e-3
	tscSampleGap = 10000 // ticks: a sample read across a longer gap was interrupted
)

var (
	tscAnchorC, tscAnchorN = sampleTSC()
	tscCalibrated          sync.Once
)

// calibrateClock makes sure tscMinSpan has passed since the first sample.
// New calls it, so at most the first agent of a process waits, once.
func calibrateClock() {
	if !tscUsable {
		return
	}
	tscCalibrated.Do(func() {
		if wait := tscMinSpan - time.Duration(monoNanos()-tscAnchorN); wait > 0 {
			time.Sleep(wait)
		}
	})
}

// sampleTSC reads the counter and the monotonic clock together: c is
// the counter no later than the moment n was read.
func sampleTSC() (c, n int64) {
	for range 100 {
		c1 := rdtsc()
		n = monoNanos()
		if rdtsc()-c1 < tscSampleGap {
			return c1, n
		}
	}
	return rdtsc(), monoNanos() // always interrupted: late reads make an early deadline
}

func tscDeadline(deadline time.Time) int64 {
	calibrateClock()
	c, n := sampleTSC()
	left := int64(deadline.Sub(clockBase)) - n
	if left <= 0 {
		return c
	}
	rate := float64(c-tscAnchorC) / float64(n-tscAnchorN) * (1 - tscSlack)
	return c + int64(float64(left)*rate)
}
