package fleet

import (
	"context"
	"sync"
	"time"

	"github.com/phasecast/phasecast/broadcaster"
)

// AckClock times acknowledgements from the broadcaster's
// Config.OnRecorded hook: for each awaited agent, the commit time of the
// first recorded status whose drained epoch reaches the awaited one. It
// reads nothing from the database, and it is exact to the commit.
type AckClock struct {
	mu    sync.Mutex
	epoch int64
	want  map[string]bool
	seen  map[string]time.Time
	done  chan struct{} // closed when every awaited agent is seen; nil when not armed
}

// Expect arms the clock for epoch and the agents in ids, replacing any
// earlier wait. Call it before the flip, so no acknowledgement can be
// recorded before the clock looks for it.
func (c *AckClock) Expect(epoch int64, ids map[string]bool) *AckWait {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.epoch, c.want, c.seen, c.done = epoch, ids, make(map[string]time.Time, len(ids)), make(chan struct{})
	return &AckWait{c: c, done: c.done}
}

// OnRecorded is the broadcaster's Config.OnRecorded.
func (c *AckClock) OnRecorded(at time.Time, recorded []broadcaster.RecordedStatus) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.done == nil {
		return
	}
	for _, r := range recorded {
		if r.DrainedEpoch < c.epoch || !c.want[r.AgentID] {
			continue
		}
		if _, ok := c.seen[r.AgentID]; !ok {
			c.seen[r.AgentID] = at
		}
	}
	if len(c.seen) == len(c.want) {
		close(c.done)
		c.done = nil
	}
}

// AckWait is one armed wait of an AckClock.
type AckWait struct {
	c    *AckClock
	done chan struct{}
}

// Wait returns the time of each acknowledgement recorded, once all are in,
// limit has passed or ctx ends; the clock is then disarmed.
func (w *AckWait) Wait(ctx context.Context, limit time.Duration) []time.Time {
	Await(ctx, w.done, limit)
	w.c.mu.Lock()
	defer w.c.mu.Unlock()
	if w.c.done == w.done {
		w.c.done = nil // disarm: time ran out
	}
	out := make([]time.Time, 0, len(w.c.seen))
	for _, t := range w.c.seen {
		out = append(out, t)
	}
	return out
}

// Cancel disarms the clock without waiting.
func (w *AckWait) Cancel() { w.Wait(context.Background(), 0) }

// Await waits until done is closed, limit has passed or ctx ends.
func Await(ctx context.Context, done <-chan struct{}, limit time.Duration) {
	t := time.NewTimer(limit)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
	case <-ctx.Done():
	}
}
