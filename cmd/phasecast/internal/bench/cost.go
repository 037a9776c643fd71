package bench

import (
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/phasecast/phasecast/internal/amqpx"
	"github.com/phasecast/phasecast/internal/retry"
	"github.com/phasecast/phasecast/internal/wire"
)

// Cost is what phasecast costs to run.
type Cost struct {
	Agents int `json:"agents"`
	// AckedFlips is the closed loop on each path: flip, wait until every
	// agent's acknowledgement is recorded, flip again at once.
	AckedFlips []AckedFlips `json:"acked_flips"`
	// Burst is the open loop, agents without a DB: flips committed back to
	// back, as fast as the store takes them.
	Burst Burst `json:"burst"`
	// Statuses is the broadcaster's status intake under saturation.
	Statuses StatusIntake `json:"statuses"`
}

// AckedFlips is the closed-loop rate on one path.
type AckedFlips struct {
	Path           Path    `json:"path"`
	Flips          int     `json:"flips"`
	FlipsPerSecond float64 `json:"flips_per_second"`
}

// Burst is the open-loop measurement.
type Burst struct {
	Flips            int     `json:"flips"`
	FlipsPerSecond   float64 `json:"flips_per_second"`
	StatesPublished  int64   `json:"states_published"`
	StatesPerSecond  float64 `json:"states_per_second"`
	CatchUpMS        float64 `json:"catch_up_ms"` // last flip's commit → every agent's ack of it recorded
	StatusesRecorded int64   `json:"statuses_recorded"`
}

// StatusIntake is the broadcaster's status recording rate when statuses
// arrive faster than it can record them.
type StatusIntake struct {
	Offered          int64   `json:"offered"`
	OfferedPerSecond float64 `json:"offered_per_second"`
	RecordedPerSec   float64 `json:"recorded_per_second"`
	BatchesPerSec    float64 `json:"batches_per_second"`
	GrantsPerSec     float64 `json:"grants_per_second"`
	DistinctAgents   int     `json:"distinct_agents"`
}

// runCost measures the broadcaster's sustained rates.
func (e *env) runCost(ctx context.Context) (*Cost, error) {
	n := e.opts.CostAgents
	c := &Cost{Agents: n}
	for _, p := range e.opts.Paths {
		progress(e.opts, "bench: cost: %d agents (%s): acknowledged flips, closed loop, %s", n, p, e.opts.CostDuration)
		fl, err := e.startFleet(ctx, n, p, fmt.Sprintf("cost-%s-%d-", p, n), e.opts.Heartbeat, true)
		if err != nil {
			return nil, err
		}
		if err := retry.Sleep(ctx, 500*time.Millisecond); err != nil {
			fl.stop()
			return nil, err
		}
		flips := 0
		start := time.Now()
		for time.Since(start) < e.opts.CostDuration {
			lat, missing, err := e.timeFlip(ctx, fl)
			if err != nil {
				fl.stop()
				return nil, err
			}
			if missing > 0 || len(lat) == 0 {
				fl.stop()
				return nil, fmt.Errorf("%d agents did not acknowledge within %s", missing, ackTimeout)
			}
			flips++
		}
		c.AckedFlips = append(c.AckedFlips, AckedFlips{Path: p, Flips: flips, FlipsPerSecond: float64(flips) / time.Since(start).Seconds()})

		if p == PathNoDB {
			if c.Burst, err = e.burst(ctx, fl); err != nil {
				fl.stop()
				return nil, err
			}
		}
		fl.stop()
	}
	progress(e.opts, "bench: cost: status intake, %s", e.opts.CostDuration)
	var err error
	if c.Statuses, err = e.statusIntake(ctx); err != nil {
		return nil, err
	}
	return c, nil
}

// burst commits flips back to back for CostDuration, then times how long
// the fleet takes to acknowledge the last one.
func (e *env) burst(ctx context.Context, fl *agentFleet) (Burst, error) {
	progress(e.opts, "bench: cost: %d agents: flips back to back, %s", len(fl.agents), e.opts.CostDuration)
	before := e.bc.Stats()
	var b Burst
	start := time.Now()
	var w ackWaiter
	var last time.Time
	for time.Since(start) < e.opts.CostDuration {
		if w != nil {
			w.Cancel()
		}
		w = e.clock.Expect(e.epoch+1, fl.ids)
		at, err := e.flip(ctx)
		if err != nil {
			w.Cancel()
			return b, err
		}
		last = at
		b.Flips++
	}
	elapsed := time.Since(start).Seconds()
	times := w.Wait(ctx, ackTimeout)
	if len(times) < len(fl.ids) {
		return b, fmt.Errorf("after the burst, %d of %d agents acknowledged the last flip", len(times), len(fl.ids))
	}
	var lastAck time.Time
	for _, t := range times {
		if t.After(lastAck) {
			lastAck = t
		}
	}
	after := e.bc.Stats()
	b.FlipsPerSecond = float64(b.Flips) / elapsed
	b.StatesPublished = after.StatesPublished - after.BeaconsPublished - (before.StatesPublished - before.BeaconsPublished)
	b.StatesPerSecond = float64(b.StatesPublished) / elapsed
	b.CatchUpMS = ms(lastAck.Sub(last))
	b.StatusesRecorded = after.StatusesRecorded - before.StatusesRecorded
	return b, nil
}

func grantSink(prefix string) string { return prefix + ".bench.grants" }

// statusIntake offers valid statuses, from 5000 made-up agents, to the
// status queue as fast as one publisher can for CostDuration, and counts
// what the broadcaster records, and the grants it sends (to a queue read
// and discarded here), in the second half of that time, when the queue
// has a backlog.
func (e *env) statusIntake(ctx context.Context) (StatusIntake, error) {
	const agents = 5000 // more than a batch, so a batch never holds one agent twice
	// The statuses must name the store, or the broadcaster drops them.
	storeID, err := e.store.ID(ctx)
	if err != nil {
		return StatusIntake{}, err
	}
	var wg sync.WaitGroup
	defer wg.Wait() // last: the goroutines end when the connections close
	conn, err := amqpx.Dial(e.opts.AMQPURL, "phasecast bench status intake")
	if err != nil {
		return StatusIntake{}, err
	}
	defer conn.CloseDeadline(time.Now().Add(5 * time.Second))
	sinkConn, err := amqpx.Dial(e.opts.AMQPURL, "phasecast bench grant sink")
	if err != nil {
		return StatusIntake{}, err
	}
	defer sinkConn.CloseDeadline(time.Now().Add(5 * time.Second))
	sink, err := sinkConn.Channel()
	if err != nil {
		return StatusIntake{}, err
	}
	q, err := sink.QueueDeclare(grantSink(e.prefix), false, true, false, false, nil)
	if err != nil {
		return StatusIntake{}, err
	}
	if err := amqpx.DeclareGrantExchange(sink, e.prefix); err != nil {
		return StatusIntake{}, err
	}
	// Each simulated agent has its own token, as each agent process does,
	// and its grants routed to the sink by its ID.
	tokens := make([]string, agents)
	for i := range tokens {
		tokens[i] = randomToken()
		if err := sink.QueueBind(q.Name, rateAgent(i), amqpx.GrantExchange(e.prefix), false, nil); err != nil {
			return StatusIntake{}, err
		}
	}
	user := amqpx.URLUser(e.opts.AMQPURL)
	grants, err := sink.Consume(q.Name, "", true, false, false, false, nil)
	if err != nil {
		return StatusIntake{}, err
	}
	wg.Go(func() {
		for range grants { // closes with the connection
		}
	})
	ch, err := conn.Channel()
	if err != nil {
		return StatusIntake{}, err
	}

	pctx, stop := context.WithCancel(ctx)
	defer stop()
	var offered atomic.Int64
	seq := uint64(time.Now().UnixNano())
	wg.Go(func() {
		for i := 0; pctx.Err() == nil; i++ {
			seq++
			body, err := wire.EncodeStatus(wire.Status{
				StoreID: storeID, AgentID: rateAgent(i % agents), Incarnation: "bench-rate", Token: tokens[i%agents],
				Service: "bench-rate", Host: "bench", PID: 1, Version: "bench",
				Releases: []string{"L"}, Seq: seq, AppliedEpoch: e.epoch, DrainedEpoch: e.epoch,
				SentAt: time.Now().UTC(),
			})
			if err != nil {
				return
			}
			if ch.PublishWithContext(pctx, "", amqpx.StatusQueue(e.prefix), false, false, amqp.Publishing{Body: body, UserId: user}) != nil {
				return
			}
			offered.Add(1)
		}
	})
	half := e.opts.CostDuration / 2
	if err := retry.Sleep(ctx, half); err != nil {
		return StatusIntake{}, err
	}
	s0, t0 := e.bc.Stats(), time.Now()
	if err := retry.Sleep(ctx, e.opts.CostDuration-half); err != nil {
		return StatusIntake{}, err
	}
	// The window ends only once a batch has been recorded and granted in
	// it: on a loaded machine one batch of a saturated queue can outlast
	// a short window, which would read as an intake of zero.
	quiet := func() bool {
		s := e.bc.Stats()
		return s.StatusBatches == s0.StatusBatches || s.GrantsSent == s0.GrantsSent
	}
	for deadline := time.Now().Add(10 * time.Second); quiet() && time.Now().Before(deadline); {
		if err := retry.Sleep(ctx, 20*time.Millisecond); err != nil {
			return StatusIntake{}, err
		}
	}
	s1, elapsed := e.bc.Stats(), time.Since(t0).Seconds()
	stop()
	total := offered.Load()
	_ = ch.Close()
	// The backlog goes; the broadcaster acks what it had fetched.
	if pch, err := conn.Channel(); err == nil {
		_, _ = pch.QueuePurge(amqpx.StatusQueue(e.prefix), false)
		_ = pch.Close()
	}
	return StatusIntake{
		Offered:          total,
		OfferedPerSecond: float64(total) / e.opts.CostDuration.Seconds(),
		RecordedPerSec:   float64(s1.StatusesRecorded-s0.StatusesRecorded) / elapsed,
		BatchesPerSec:    float64(s1.StatusBatches-s0.StatusBatches) / elapsed,
		GrantsPerSec:     float64(s1.GrantsSent-s0.GrantsSent) / elapsed,
		DistinctAgents:   agents,
	}, nil
}

// rateAgent is the ID of the status intake's simulated agent i.
func rateAgent(i int) string { return fmt.Sprintf("rate-%d", i) }

// randomToken is a fresh agent token (wire.Status.Token).
func randomToken() string {
	b := make([]byte, wire.TokenSize)
	_, _ = crand.Read(b)
	return hex.EncodeToString(b)
}
