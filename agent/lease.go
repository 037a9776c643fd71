package agent

import (
	"time"

	"golang.org/x/time/rate"
)

// The lease, on the agent's own monotonic clock.
//
// A status sent at local time t_s and answered by a grant of lease L
// extends the deadline to t_s + L − LeaseMargin. The broadcaster records
// the status, and the lease, on the database clock when it writes the
// status: necessarily after t_s. A re-sync through the store works the same
// way with t_s taken before the transaction starts. So the local deadline
// always falls before the lease the contract runner sees expires, and an
// agent that can no longer renew (partitioned from the broker and the
// database) has fenced itself before the runner stops waiting for it.
//
// The deadline is only ever moved forward. When it passes, the lease timer
// sets the fenced flag. Enter reads the flag and also compares the
// deadline with a cheap clock itself (clock.go), since after a pause the
// timer may not have run yet.

// extendLease moves the deadline to from + lease − LeaseMargin if that is
// later, and lifts the fence if the deadline is still ahead. It reports
// whether the lease is valid now.
func (a *Agent) extendLease(from time.Time, lease time.Duration) bool {
	until := from.Add(lease - a.cfg.LeaseMargin)
	a.leaseMu.Lock()
	moved := until.After(a.deadline)
	if moved {
		a.deadline = until
	}
	valid := a.running && time.Now().Before(a.deadline)
	wasFenced := a.fenced.Load()
	if valid && (moved || wasFenced) {
		// The tick deadline first: the fast path, having read it, still
		// looks at the flag after pinning.
		a.leaseEnd.Store(deadlineTicks(a.deadline))
		a.fenced.Store(false)
	}
	a.leaseMu.Unlock()
	poke(a.leasePoke)
	if valid && wasFenced {
		a.log.Info().Dur("lease_remaining", time.Until(until)).Msg("lease valid; serving")
	}
	return valid
}

// fenceLocked fences the agent: Enter refuses (or re-syncs) until the
// lease is extended. Under leaseMu.
func (a *Agent) fenceLocked() {
	a.fenced.Store(true)
	a.leaseEnd.Store(0)
}

// leaseFresh reports whether at least half a lease is still ahead, so a
// status sent now needs no grant: the next heartbeat's will come long
// before the deadline.
func (a *Agent) leaseFresh() bool {
	a.leaseMu.Lock()
	defer a.leaseMu.Unlock()
	return !a.fenced.Load() && time.Until(a.deadline) > a.leaseLength()/2
}

// leaseLength is the lease the agent asks the store for: the last one the
// broadcaster granted, so both paths agree, or Config.InitialLease before
// any grant.
func (a *Agent) leaseLength() time.Duration {
	if ms := a.leaseMS.Load(); ms > 0 {
		return time.Duration(ms) * time.Millisecond
	}
	return a.cfg.InitialLease
}

// expire fences the agent if its deadline has passed on the monotonic
// clock, and returns the time left. The flag is set under leaseMu after
// re-reading the deadline, so a concurrent extension is never overwritten
// by a stale expiry. by says who noticed: the lease timer, or an Enter
// that got there first (the process was paused, or the timer is late).
func (a *Agent) expire(by string) time.Duration {
	a.leaseMu.Lock()
	wait := time.Until(a.deadline)
	fencedNow := wait <= 0 && a.running && !a.fenced.Load()
	if fencedNow {
		a.fenceLocked()
	}
	a.leaseMu.Unlock()
	if fencedNow {
		a.fencings.Add(1)
		// With a DB, the next Enter or heartbeat renews through the
		// store; without one, only a grant can.
		a.log.Warn().Bool("store", a.store != nil).Str("noticed_by", by).Dur("overdue", -wait).
			Msg("lease ran out; fenced until it is renewed")
	}
	return wait
}

// leaseLoop fences the agent when the deadline passes.
func (a *Agent) leaseLoop(r *runState) {
	t := time.NewTimer(time.Hour)
	t.Stop()
	for {
		wait := time.Duration(0) // a test's paused process: no timer, only pokes
		if !a.hooks.leaseTimerStopped.Load() {
			wait = a.expire("lease_timer")
		}
		if wait > 0 {
			t.Reset(wait)
		}
		select {
		case <-r.ctx.Done():
			t.Stop()
			return
		case <-t.C:
		case <-a.leasePoke:
		}
		t.Stop()
	}
}

// heartbeatLoop sends a status every HeartbeatInterval; report picks the
// path (the broker, and the store when fenced or disconnected).
func (a *Agent) heartbeatLoop(r *runState) {
	t := time.NewTicker(a.cfg.HeartbeatInterval)
	defer t.Stop()
	for {
		select {
		case <-r.ctx.Done():
			return
		case <-r.hush:
			return
		case <-t.C:
			a.report(r.ctx, "heartbeat")
		}
	}
}

// confirmLoop (with a DB only) reads the store when a state message or a
// grant says there is a newer epoch, at most once per ConfirmInterval:
// messages arriving meanwhile collapse into one read. The store's answer is
// what gets applied, so a forged state changes nothing.
func (a *Agent) confirmLoop(r *runState) {
	limit := rate.NewLimiter(rate.Every(a.cfg.ConfirmInterval), confirmBurst)
	for {
		select {
		case <-r.ctx.Done():
			return
		case <-a.confirmPoke:
		}
		if limit.Wait(r.ctx) != nil {
			return
		}
		hint := a.confirmHint.Swap(0)
		if hint > a.appliedEpoch() {
			if err := a.confirm(r.ctx); err == nil && hint > a.appliedEpoch() {
				a.reject(rejUnconfirmed, nil, hint)
			}
		}
	}
}

// requestConfirm asks the confirmer to read the store, remembering the
// highest epoch a message claimed.
func (a *Agent) requestConfirm(epoch int64) {
	for {
		h := a.confirmHint.Load()
		if epoch <= h || a.confirmHint.CompareAndSwap(h, epoch) {
			break
		}
	}
	poke(a.confirmPoke)
}
