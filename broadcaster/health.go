package broadcaster

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// errBrokerLost means the leader could reach no broker node for
// Config.BrokerLossTimeout: it steps down so that a standby that can
// reach one leads.
var errBrokerLost = errors.New("no broker reachable")

// brokerHealth is what a term knows of its broker links. The publisher
// and the consumer set their flag; the runner reads them on each tick.
type brokerHealth struct {
	// publishing: the publishing session is up and its last state was
	// confirmed by the broker.
	publishing atomic.Bool
	// consuming: the status consumer's session is up and consuming.
	consuming atomic.Bool
}

// healthy reports whether the term can both publish and consume.
func (h *brokerHealth) healthy() bool { return h.publishing.Load() && h.consuming.Load() }

// tracked runs session with flag cleared when it ends, so a lost
// connection clears what the session set once it was working.
func tracked(flag *atomic.Bool, session func(context.Context, *amqp.Connection) error) func(context.Context, *amqp.Connection) error {
	return func(ctx context.Context, conn *amqp.Connection) error {
		defer flag.Store(false)
		return session(ctx, conn)
	}
}

// checkBroker ends a term that has been deaf (not healthy) for
// Config.BrokerLossTimeout. A term starts deaf: one that never reaches a
// broker steps down as one that lost it. The runner calls it on its
// goroutine, which owns term.deafSince.
func (r *runner) checkBroker(now time.Time) error {
	t := r.term
	if t.l.healthy() {
		t.deafSince = time.Time{}
		return nil
	}
	if t.deafSince.IsZero() {
		t.deafSince = now
	}
	if deaf := now.Sub(t.deafSince); deaf >= r.b.cfg.BrokerLossTimeout {
		return fmt.Errorf("%w for %s (Config.BrokerLossTimeout %s): publishing %t, consuming %t",
			errBrokerLost, deaf.Round(time.Millisecond), r.b.cfg.BrokerLossTimeout, t.l.publishing.Load(), t.l.consuming.Load())
	}
	return nil
}

// publishingLeader is what the liveness row says of leadership: leading
// and able to publish and consume. The contract runner counts only such a
// broadcaster as alive (schema.ContractOptions.LeaderWithin), so a leader
// that lost its broker is not taken for one that reaches the agents.
func (r *runner) publishingLeader() bool {
	return r.term != nil && r.b.IsLeader() && r.term.l.healthy()
}

// awaitHealthy waits, at most d, for a new term's first confirmed state
// and its consumer, so that the liveness row written right after shows a
// leader that publishes rather than one still connecting.
func (r *runner) awaitHealthy(ctx context.Context, d time.Duration) {
	deadline := time.Now().Add(d)
	for r.term != nil && !r.term.l.healthy() && time.Now().Before(deadline) && ctx.Err() == nil {
		time.Sleep(5 * time.Millisecond)
	}
}
