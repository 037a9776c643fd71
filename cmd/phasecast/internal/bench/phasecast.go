package bench

import (
	"context"
	"crypto/ed25519"
	"fmt"
	"math/rand/v2"
	"runtime"
	"slices"
	"sync"
	"time"

	"github.com/phasecast/phasecast/agent"
	"github.com/phasecast/phasecast/cmd/phasecast/fleet"
	"github.com/phasecast/phasecast/cmd/phasecast/internal/latency"
	"github.com/phasecast/phasecast/internal/retry"
	"github.com/phasecast/phasecast/internal/wire"
)

// ackTimeout bounds the wait for one flip's acknowledgements.
const ackTimeout = 30 * time.Second

// runPhasecast starts n agents on path, flips Options.Flips times and
// times each flip from its commit to the commit of every agent's ack.
func (e *env) runPhasecast(ctx context.Context, n int, path Path) (*Phasecast, error) {
	progress(e.opts, "bench: %d agents (%s): starting, spread over one heartbeat", n, path)
	before, brokerBefore := memNow(), brokerRSS()
	t0 := time.Now()
	fl, err := e.startFleet(ctx, n, path, fmt.Sprintf("bench-%s-%d-", path, n), e.opts.Heartbeat, true)
	if err != nil {
		return nil, err
	}
	defer fl.stop()
	started := time.Since(t0)
	after := memNow()
	pc := &Phasecast{
		Path:               path,
		StartSeconds:       started.Seconds(),
		HeapBytesPerAgent:  float64(int64(after.heap)-int64(before.heap)) / float64(n),
		GoroutinesPerAgent: float64(after.goroutines-before.goroutines) / float64(n),
	}
	// Let the start-up statuses and grants settle.
	if err := retry.Sleep(ctx, 500*time.Millisecond); err != nil {
		return nil, err
	}
	brokerGrowth := float64(brokerRSS()-brokerBefore) / float64(n)
	progress(e.opts, "bench: %d agents (%s): started in %.1fs; %d flips", n, path, started.Seconds(), e.opts.Flips)
	var flips, applied [][]time.Duration
	missing := 0
	stopProfile, err := e.profile(fmt.Sprintf("phasecast-%s-%d", path, n))
	if err != nil {
		return nil, err
	}
	defer stopProfile()
	mark := e.cpuNow(ctx)
	for range e.opts.Flips {
		if err := e.pause(ctx); err != nil {
			return nil, err
		}
		e.applied.arm(uint64(e.epoch + 1))
		lat, miss, err := e.timeFlip(ctx, fl)
		if err != nil {
			return nil, err
		}
		flips = append(flips, lat)
		applied = append(applied, latency.Since(e.applied.take(), fl.committed))
		missing += miss
	}
	cpu := mark.per(ctx, e.opts.Flips)
	stopProfile()
	pc.Measured = summarize(flips, missing)
	pc.CPU = cpu
	pc.BrokerBytesPerMember = brokerGrowth
	pc.Delivered = lastOf(applied)
	progress(e.opts, "bench: %d agents (%s): p50 %.1fms p99 %.1fms (commit → last ack recorded)", n, path, pc.PerFlip.P50MS, pc.PerFlip.P99MS)
	return pc, nil
}

// timeFlip flips once and returns each agent's time from the commit to
// its acknowledgement's commit, and how many never came.
func (e *env) timeFlip(ctx context.Context, fl *agentFleet) ([]time.Duration, int, error) {
	want := e.epoch + 1
	var w ackWaiter
	if e.opts.AckWatch == "poll" {
		w = e.pollAcks(ctx, want, fl.idPrefix, len(fl.ids))
	} else {
		w = e.clock.Expect(want, fl.ids)
	}
	committed, err := e.flip(ctx)
	if err != nil {
		w.Cancel()
		return nil, 0, err
	}
	fl.committed = committed
	times := w.Wait(ctx, ackTimeout)
	if ctx.Err() != nil {
		return nil, 0, ctx.Err()
	}
	lat := make([]time.Duration, 0, len(times))
	for _, t := range times {
		lat = append(lat, t.Sub(committed))
	}
	return lat, len(fl.ids) - len(lat), nil
}

// ackWaiter waits for one epoch's acknowledgements: a fleet.AckWait, or
// a pollWait.
type ackWaiter interface {
	// Wait returns the time of each acknowledgement seen within limit.
	Wait(ctx context.Context, limit time.Duration) []time.Time
	Cancel()
}

// pollWait counts acknowledgements in the store with one query per
// millisecond, as an outside observer would: each poll that finds k more
// acks than the last dates k of them.
type pollWait struct {
	stop  context.CancelFunc
	done  chan struct{}
	mu    sync.Mutex
	times []time.Time
}

func (e *env) pollAcks(ctx context.Context, epoch int64, idPrefix string, n int) ackWaiter {
	pctx, stop := context.WithCancel(ctx)
	w := &pollWait{stop: stop, done: make(chan struct{})}
	go func() {
		defer close(w.done)
		seen := 0
		for pctx.Err() == nil && seen < n {
			if count, err := e.store.CountAcked(pctx, "L", epoch, idPrefix); err == nil && count > seen {
				now := time.Now()
				w.mu.Lock()
				for range count - seen {
					w.times = append(w.times, now)
				}
				w.mu.Unlock()
				seen = count
			}
			_ = retry.Sleep(pctx, time.Millisecond)
		}
	}()
	return w
}

func (w *pollWait) Wait(ctx context.Context, limit time.Duration) []time.Time {
	fleet.Await(ctx, w.done, limit)
	w.stop()
	<-w.done
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.times)
}

func (w *pollWait) Cancel() { w.stop(); <-w.done }

// fleet is n running agents on shared connections.
type agentFleet struct {
	agents    []*agent.Agent
	conns     []*agent.SharedConnection
	ids       map[string]bool
	idPrefix  string
	committed time.Time // the last flip's
}

// startFleet starts n agents on path, AgentsPerConn to a connection. With
// spread, agent i starts i/n of a heartbeat after the first, so the
// heartbeats are spread as in a real fleet rather than all in step.
func (e *env) startFleet(ctx context.Context, n int, path Path, idPrefix string, heartbeat time.Duration, spread bool) (*agentFleet, error) {
	fl := &agentFleet{ids: make(map[string]bool, n), idPrefix: idPrefix}
	for i := 0; i < n; i += e.opts.AgentsPerConn {
		c, err := agent.NewSharedConnection(e.opts.AMQPURL, fmt.Sprintf("phasecast bench %s %d", idPrefix, len(fl.conns)), e.opts.Logger)
		if err != nil {
			fl.stop()
			return nil, err
		}
		fl.conns = append(fl.conns, c)
	}
	for i := range n {
		cfg := agent.Config{
			Service: "bench", ID: fmt.Sprintf("%s%d", idPrefix, i), Host: "bench", Version: "bench",
			Releases: []string{"L"}, Tables: benchTables(),
			Schema: e.store.Schema(), ExchangePrefix: e.prefix, Connection: fl.conns[i/e.opts.AgentsPerConn],
			StateKey:          e.stateKey.Public().(ed25519.PublicKey),
			HeartbeatInterval: heartbeat,
			Logger:            e.opts.Logger.With().Str("component", "agent").Logger(),
			OnChange: func(_, cur *agent.Snapshot) {
				e.applied.mark(uint64(cur.Epoch()), time.Now())
			},
		}
		if path == PathDB || path == PathDBRead {
			cfg.DB = e.agents.DB
			cfg.ConfirmSignedStates = path == PathDBRead
		}
		a, err := agent.New(cfg)
		if err != nil {
			fl.stop()
			return nil, err
		}
		fl.agents = append(fl.agents, a)
		fl.ids[cfg.ID] = true
	}
	startCtx, cancel := context.WithTimeout(ctx, heartbeat+60*time.Second)
	defer cancel()
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i, a := range fl.agents {
		wg.Go(func() {
			if spread && n > 1 {
				if errs[i] = retry.Sleep(startCtx, time.Duration(int64(heartbeat)*int64(i)/int64(n))); errs[i] != nil {
					return
				}
			}
			errs[i] = a.Start(startCtx)
		})
	}
	wg.Wait()
	if err := firstError(errs); err != nil {
		fl.stop()
		st := e.bc.Stats()
		return nil, fmt.Errorf("start agents: %w (the broadcaster so far: %d states published, %d statuses recorded in %d batches, %d grants sent, %d dropped, rejected %v)",
			err, st.StatesPublished, st.StatusesRecorded, st.StatusBatches, st.GrantsSent, st.GrantsDropped, st.Rejected)
	}
	return fl, nil
}

// stop stops every agent, then closes the connections.
func (fl *agentFleet) stop() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	for _, a := range fl.agents {
		wg.Go(func() { _ = a.Stop(ctx) })
	}
	wg.Wait()
	for _, c := range fl.conns {
		_ = c.Close()
	}
	fl.agents, fl.conns = nil, nil
}

type mem struct {
	heap       uint64
	goroutines int
}

// memNow is the live heap after a full collection, and the goroutines.
func memNow() mem {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return mem{heap: ms.HeapAlloc, goroutines: runtime.NumGoroutine()}
}

// summarize turns each flip's latencies into the per-flip and per-member
// distributions.
func summarize(flips [][]time.Duration, missing int) Measured {
	return Measured{Missing: missing, flips: flips, PerFlip: *lastOf(flips), PerAgent: dist(flat(flips))}
}

func dist(ds []time.Duration) Dist {
	s := latency.Summarize(ds)
	return Dist{N: s.N, MinMS: ms(s.Min), P50MS: ms(s.P50), P99MS: ms(s.P99), MaxMS: ms(s.Max)}
}

// messageSizes returns the size of the state message the broadcaster
// sends for the current state, and of a typical status, so the floor
// moves messages of the same sizes.
func (e *env) messageSizes(ctx context.Context) (int, int, error) {
	st, err := e.store.State(ctx)
	if err != nil {
		return 0, 0, err
	}
	st.SentAt = time.Now().UTC()
	state, err := wire.EncodeState(st)
	if err != nil {
		return 0, 0, err
	}
	status, err := wire.EncodeStatus(wire.Status{
		StoreID: st.StoreID, AgentID: "bench-db-1000-999", Incarnation: "0123456789abcdef", Token: randomToken(),
		Service: "bench", Host: "bench", PID: 123456, Version: "bench",
		Releases: []string{"L"}, Seq: uint64(time.Now().UnixNano()), AppliedEpoch: 10, DrainedEpoch: 10,
		AppName: "phasecast:bench-db-1000-999", SentAt: time.Now().UTC(),
	})
	if err != nil {
		return 0, 0, err
	}
	return len(state), len(status), nil
}

func randN(n int64) int64 {
	if n <= 0 {
		return 0
	}
	return rand.Int64N(n)
}

// stamps collects the times at which members reached the awaited key (an
// epoch, a round).
type stamps struct {
	mu    sync.Mutex
	key   uint64
	times []time.Time
}

func (s *stamps) arm(key uint64) {
	s.mu.Lock()
	s.key, s.times = key, nil
	s.mu.Unlock()
}

func (s *stamps) mark(key uint64, at time.Time) {
	s.mu.Lock()
	if key == s.key {
		s.times = append(s.times, at)
	}
	s.mu.Unlock()
}

func (s *stamps) take() []time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	t := s.times
	s.key, s.times = 0, nil
	return t
}

// lastOf is the distribution, over flips, of the latest latency of each.
func lastOf(flips [][]time.Duration) *Dist {
	var last []time.Duration
	for _, f := range flips {
		if len(f) > 0 {
			last = append(last, slices.Max(f))
		}
	}
	d := dist(last)
	return &d
}

// firstError returns the first non-nil error of errs, saying how many
// more there were: a thousand agents failing alike make one line.
func firstError(errs []error) error {
	var first error
	n := 0
	for _, err := range errs {
		if err != nil {
			if first == nil {
				first = err
			}
			n++
		}
	}
	if n > 1 {
		return fmt.Errorf("%w (and %d more)", first, n-1)
	}
	return first
}
