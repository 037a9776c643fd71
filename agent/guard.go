package agent

import (
	"errors"
	"fmt"
	"time"

	"github.com/phasecast/phasecast/schema"
)

// Guard pins one snapshot for one unit of work (a request, a transaction):
// the agent does not acknowledge a newer state until every guard pinned to
// an older snapshot has exited. It is a small value; copying it does not
// allocate. Call Exit exactly once.
type Guard struct {
	s *Snapshot
}

// Snapshot returns the pinned snapshot; nil for the zero Guard that
// accompanies an error from Enter.
func (g Guard) Snapshot() *Snapshot { return g.s }

// Exit releases the guard. Exit on the zero Guard does nothing.
func (g Guard) Exit() {
	if g.s != nil {
		g.s.exit()
	}
}

func (s *Snapshot) exit() {
	n := s.inflight.Add(-1)
	if n == 0 {
		// Read retired only after the decrement: a swap that retires s
		// after this load sees the count at zero itself.
		if s.retired.Load() {
			poke(s.drain)
		}
	} else if n < 0 {
		panic("agent: Guard.Exit called more often than Enter")
	}
}

// Enter pins the current snapshot for one unit of work; the caller must
// call Exit on the guard when the work is done (defer g.Exit()).
//
// On the hot path Enter is a read of a cheap clock against the lease
// deadline (clock.go; the deadline is zero while the agent is fenced), one
// atomic increment, a re-check of the snapshot pointer and a look at the
// fence flag; it does not allocate. Once the lease has run out (the agent is
// fenced, or the deadline has passed and the lease timer has not run yet,
// as after the process was paused), Enter with a DB re-syncs from the
// store first (one caller syncs, the others wait for its result) and
// returns a guard on the fresh snapshot; without a DB, or if the re-sync
// fails, it returns ErrStale.
func (a *Agent) Enter() (Guard, error) {
	if ticks() >= a.leaseEnd.Load() {
		return a.enterFenced()
	}
	// pin's first try, written out: the call it saves pays for the clock
	// read.
	s := a.cur.Load()
	s.inflight.Add(1)
	g := Guard{s}
	if a.cur.Load() != s {
		g = a.repin(s)
	}
	// Fenced before or since the check (the lease ran out, or Stop): back
	// out. The flag is the truth; the deadline only spares a fenced Enter
	// the pin. Pinning before this look pairs with Stop setting the fence
	// before it counts open guards: one of the two sees the other, so Stop
	// never says goodbye with a guard about to open.
	if a.fenced.Load() {
		g.Exit()
		return a.enterFenced()
	}
	return g, nil
}

// pin returns a guard on the current snapshot. Incrementing first and then
// re-checking the pointer makes it race-free against a swap: either the
// snapshot was still current after our increment, so the drainer (which
// reads the count only after the swap) sees the guard, or we back out and
// try the newer snapshot. Enter writes out the first try itself (the
// compiler will not inline pin), which pays for its clock read.
func (a *Agent) pin() Guard {
	s := a.cur.Load()
	s.inflight.Add(1)
	if a.cur.Load() == s {
		return Guard{s}
	}
	return a.repin(s)
}

// repin backs out of s, swapped out under the pin, and tries again.
func (a *Agent) repin(s *Snapshot) Guard {
	for {
		s.exit()
		s = a.cur.Load()
		s.inflight.Add(1)
		if a.cur.Load() == s {
			return Guard{s}
		}
	}
}

// enterFenced is Enter's slow path, taken while the lease is out.
func (a *Agent) enterFenced() (Guard, error) {
	// The tick clock says the deadline has passed but nothing has fenced:
	// look at the monotonic clock. Still ahead (the tick clock errs early,
	// or a renewal just came), the lease holds.
	if !a.fenced.Load() && a.expire("enter") > 0 {
		g := a.pin()
		if !a.fenced.Load() {
			return g, nil
		}
		g.Exit()
	}
	r := a.runPtr.Load()
	if r == nil || a.cur.Load() == nil {
		a.staleRefusals.Add(1)
		return Guard{}, errNotRunning
	}
	if a.store == nil {
		a.staleRefusals.Add(1)
		return Guard{}, ErrStale
	}
	if err := a.awaitResync(r); err != nil {
		a.staleRefusals.Add(1)
		return Guard{}, err
	}
	if h := a.hooks.afterResync; h != nil {
		h()
	}
	g := a.pin()
	// The second look, as on the fast path: a Stop (or a new expiry)
	// between the re-sync and the pin has fenced, and Stop may already
	// have counted no guard and said goodbye. Stop fences before it
	// counts, so one of the two sees the other.
	if a.fenced.Load() || a.runPtr.Load() != r {
		g.Exit()
		a.staleRefusals.Add(1)
		if a.runPtr.Load() != r {
			return Guard{}, errNotRunning
		}
		return Guard{}, fmt.Errorf("%w; fenced again right after the re-sync", ErrStale)
	}
	return g, nil
}

// resync is one re-sync from the store run for fenced callers of Enter.
type resync struct {
	done     chan struct{} // closed when it ends; err is set before
	err      error
	deadline time.Time // callers wait for it no longer than this
}

// awaitResync runs a re-sync (or joins the one running) and waits for it,
// but never past syncTimeout from its start: a store link that swallows
// traffic (not refuses it) leaves the query hanging until TCP gives up,
// since lib/pq cannot abandon it, and a fenced Enter must refuse work
// with ErrStale rather than stall the service meanwhile. The re-sync runs
// on, on a goroutine of the run, and its result serves later callers.
func (a *Agent) awaitResync(r *runState) error {
	rs, err := a.startResync(r)
	if err != nil {
		return err
	}
	wait := time.Until(rs.deadline)
	if wait <= 0 {
		select {
		case <-rs.done:
			return rs.err
		default:
			return fmt.Errorf("%w; re-sync from the store has not answered for %s", ErrStale, syncTimeout)
		}
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-rs.done:
		return rs.err
	case <-t.C:
		return fmt.Errorf("%w; re-sync from the store has not answered for %s", ErrStale, syncTimeout)
	case <-r.ctx.Done():
		return errNotRunning
	}
}

// startResync returns the re-sync in flight, or starts one on the run's
// wait group (never once Stop has begun waiting on it).
func (a *Agent) startResync(r *runState) (*resync, error) {
	a.resyncMu.Lock()
	defer a.resyncMu.Unlock()
	if a.resyncCur != nil {
		return a.resyncCur, nil
	}
	rs := &resync{done: make(chan struct{}), deadline: time.Now().Add(syncTimeout)}
	if !r.spawn(func() {
		rs.err = a.resyncFenced(r)
		a.resyncMu.Lock()
		a.resyncCur = nil
		a.resyncMu.Unlock()
		close(rs.done)
	}) {
		return nil, errNotRunning
	}
	a.resyncCur = rs
	return rs, nil
}

// resyncFenced re-reads the state from the store and renews the lease
// there. Callers that pile up behind one sync take its result rather than
// each running their own, and after a failure no caller tries again before
// ConfirmInterval has passed, so a database outage does not turn every
// request into a database round trip.
//
// Why this keeps the invariant: Store.SyncAgent records this agent's lease
// (now() + lease on the database clock) and reads the state in one
// transaction under the epoch row lock. Either a contract flip committed
// before it, and the fresh snapshot hides the column; or the flip commits
// after it, and the runner sees a live lease with an older drained_epoch
// and waits for this agent's ack, or for the lease to expire on the
// database clock. The local lease is extended to t_before_sync + lease −
// margin: t_before_sync precedes the database's now(), so the agent fences
// itself before the runner can consider it gone.
func (a *Agent) resyncFenced(r *runState) error {
	gen := a.syncGen.Load()
	a.statusMu.Lock()
	defer a.statusMu.Unlock()
	if !a.fenced.Load() {
		return nil // the sync we waited behind renewed the lease
	}
	if a.lastSyncErr != nil && (a.syncGen.Load() != gen || time.Since(a.lastSyncFail) < a.cfg.ConfirmInterval) {
		return fmt.Errorf("%w; re-sync from the store failed: %w", ErrStale, a.lastSyncErr)
	}
	if err := a.syncLocked(r.ctx, "fenced_enter"); errors.Is(err, schema.ErrStatusIgnored) {
		return fmt.Errorf("%w; the store read out the state but renewed no lease: %w", ErrStale, err)
	} else if err != nil {
		return fmt.Errorf("%w; re-sync from the store failed: %w", ErrStale, err)
	}
	if a.fenced.Load() {
		return fmt.Errorf("%w; re-synced, but the lease is no longer than Config.LeaseMargin", ErrStale)
	}
	return nil
}
