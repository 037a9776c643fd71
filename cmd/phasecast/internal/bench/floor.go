package bench

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/phasecast/phasecast/cmd/phasecast/internal/latency"
	"github.com/phasecast/phasecast/internal/amqpx"
)

// The floor's own topology: a fanout exchange like the state exchange, and
// a reply queue declared as the status queue is (Options.StatusQueueType:
// the default, a non-durable classic queue, is the fastest layout
// measured for either).
func floorExchange(prefix string) string { return prefix + ".floor" }
func floorReplies(prefix string) string  { return amqpx.StatusQueue(prefix + ".floor") }

// runFloor measures the least the same fan-out and reply can cost: bare
// amqp091-go and none of phasecast's logic. A publisher (its own
// connection, as the broadcaster's) sends one message, as large as the
// state message, to a fanout exchange; each of n responders (AgentsPerConn
// to a connection, each with a consuming and a publishing channel and an
// exclusive auto-delete queue, as an agent) answers with a message as
// large as a status on one reply queue, which a consumer on a connection
// of its own reads. A round is timed from just before the publish to each
// reply's arrival.
func (e *env) runFloor(ctx context.Context, n, stateBytes, statusBytes int) (Measured, error) {
	progress(e.opts, "bench: %d floor responders: starting", n)
	fctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var conns []*amqp.Connection
	var wg sync.WaitGroup
	defer func() {
		cancel()
		for _, c := range conns {
			_ = c.CloseDeadline(time.Now().Add(5 * time.Second))
		}
		wg.Wait()
	}()
	dial := func(name string) (*amqp.Connection, error) {
		c, err := amqpx.Dial(e.opts.AMQPURL, "phasecast bench floor "+name)
		if err == nil {
			conns = append(conns, c)
		}
		return c, err
	}

	pubConn, err := dial("publish")
	if err != nil {
		return Measured{}, err
	}
	pub, err := pubConn.Channel()
	if err != nil {
		return Measured{}, err
	}
	exchange, replies := floorExchange(e.prefix), floorReplies(e.prefix)
	if err := pub.ExchangeDeclare(exchange, amqp.ExchangeFanout, true, false, false, false, nil); err != nil {
		return Measured{}, err
	}
	subConn, err := dial("consume")
	if err != nil {
		return Measured{}, err
	}
	if _, err := amqpx.DeclareStatusQueueAs(subConn, e.prefix+".floor", e.opts.StatusQueueType); err != nil {
		return Measured{}, err
	}
	sub, err := subConn.Channel()
	if err != nil {
		return Measured{}, err
	}
	if _, err := sub.QueuePurge(replies, false); err != nil {
		return Measured{}, err
	}
	replyDeliveries, err := sub.Consume(replies, "", true, false, false, false, nil)
	if err != nil {
		return Measured{}, err
	}

	// The responders.
	brokerBefore := brokerRSS()
	var delivered stamps
	var rconn *amqp.Connection
	for i := range n {
		if i%e.opts.AgentsPerConn == 0 {
			if rconn, err = dial(fmt.Sprintf("responders %d", i/e.opts.AgentsPerConn)); err != nil {
				return Measured{}, err
			}
		}
		if err := startResponder(&wg, rconn, exchange, replies, uint32(i), statusBytes, &delivered); err != nil {
			return Measured{}, fmt.Errorf("responder %d: %w", i, err)
		}
	}

	// The reply consumer dates each reply of the current round.
	r := &rounds{n: n}
	wg.Go(func() {
		for {
			select {
			case <-fctx.Done():
				return
			case d, ok := <-replyDeliveries:
				if !ok {
					return
				}
				if len(d.Body) >= 8 {
					r.reply(binary.BigEndian.Uint64(d.Body), time.Now())
				}
			}
		}
	})

	brokerGrowth := float64(brokerRSS()-brokerBefore) / float64(n)
	body := make([]byte, max(stateBytes, 8))
	var flips, deliveries [][]time.Duration
	missing := 0
	stopProfile, err := e.profile(fmt.Sprintf("floor-%d", n))
	if err != nil {
		return Measured{}, err
	}
	defer stopProfile()
	mark := e.cpuNow(ctx)
	for round := range e.opts.Flips {
		if err := e.pause(ctx); err != nil {
			return Measured{}, err
		}
		binary.BigEndian.PutUint64(body, uint64(round+1))
		done := r.arm(uint64(round + 1))
		delivered.arm(uint64(round + 1))
		start := time.Now()
		if err := pub.PublishWithContext(ctx, exchange, "", false, false, amqp.Publishing{Body: body}); err != nil {
			return Measured{}, err
		}
		t := time.NewTimer(ackTimeout)
		select {
		case <-done:
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return Measured{}, ctx.Err()
		}
		t.Stop()
		times := r.take()
		lat := make([]time.Duration, 0, len(times))
		for _, at := range times {
			lat = append(lat, at.Sub(start))
		}
		flips = append(flips, lat)
		deliveries = append(deliveries, latency.Since(delivered.take(), start))
		missing += n - len(lat)
	}
	cpu := mark.per(ctx, e.opts.Flips)
	stopProfile()
	m := summarize(flips, missing)
	m.CPU = cpu
	m.BrokerBytesPerMember = brokerGrowth
	m.Delivered = lastOf(deliveries)
	progress(e.opts, "bench: %d floor responders: p50 %.1fms p99 %.1fms (publish → last reply)", n, m.PerFlip.P50MS, m.PerFlip.P99MS)
	return m, nil
}

// startResponder declares a responder's queue on conn and answers every
// message on it with one reply, until the connection closes.
func startResponder(wg *sync.WaitGroup, conn *amqp.Connection, exchange, replies string, id uint32, size int, delivered *stamps) error {
	sub, err := conn.Channel()
	if err != nil {
		return err
	}
	q, err := sub.QueueDeclare("", false, true, true, false, nil)
	if err != nil {
		return err
	}
	if err := sub.QueueBind(q.Name, "", exchange, false, nil); err != nil {
		return err
	}
	deliveries, err := sub.Consume(q.Name, "", true, true, false, false, nil)
	if err != nil {
		return err
	}
	pub, err := conn.Channel()
	if err != nil {
		return err
	}
	reply := make([]byte, max(size, 12))
	binary.BigEndian.PutUint32(reply[8:], id)
	wg.Go(func() {
		// deliveries closes with the connection.
		for d := range deliveries {
			if len(d.Body) < 8 {
				continue
			}
			delivered.mark(binary.BigEndian.Uint64(d.Body), time.Now())
			copy(reply, d.Body[:8])
			if err := pub.PublishWithContext(context.Background(), "", replies, false, false, amqp.Publishing{Body: reply}); err != nil && !errors.Is(err, amqp.ErrClosed) {
				return
			}
		}
	})
	return nil
}

// rounds collects the replies of the round in progress.
type rounds struct {
	n     int
	mu    sync.Mutex
	round uint64
	times []time.Time
	done  chan struct{}
}

func (r *rounds) arm(round uint64) <-chan struct{} {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.round, r.times, r.done = round, make([]time.Time, 0, r.n), make(chan struct{})
	return r.done
}

func (r *rounds) reply(round uint64, at time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if round != r.round || r.done == nil {
		return
	}
	r.times = append(r.times, at)
	if len(r.times) == r.n {
		close(r.done)
		r.done = nil
	}
}

func (r *rounds) take() []time.Time {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.done = nil
	return r.times
}
