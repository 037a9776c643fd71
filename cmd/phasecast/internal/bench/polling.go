package bench

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/phasecast/phasecast/internal/retry"
	"github.com/phasecast/phasecast/schema"
)

// runPolling measures the alternative to phasecast: n pollers, each
// reading the store's epoch every PollInterval, and the whole state when
// the epoch moved (the cheapest poller that still learns the state).
// Poller i starts i/n of an interval after the first, so their phases are
// spread as in a fleet started over time, and each flip waits a random
// fraction of an interval, so flips fall at random points of the cycle.
// A flip is timed from its commit to the moment the last poller read the
// new epoch. The pollers share the agents' pool (Options.DBConns).
func (e *env) runPolling(ctx context.Context, n int) (Polling, error) {
	interval := e.opts.PollInterval
	progress(e.opts, "bench: %d pollers every %s: starting", n, interval)
	store, err := schema.NewStore(e.agents, e.store.Schema())
	if err != nil {
		return Polling{}, err
	}
	pctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()
	var queries atomic.Int64
	sightings := &rounds{n: n}
	first := time.Now()
	for i := range n {
		wg.Go(func() {
			if retry.Sleep(pctx, time.Duration(int64(interval)*int64(i)/int64(n))) != nil {
				return
			}
			t := time.NewTicker(interval)
			defer t.Stop()
			var last int64 = -1
			for {
				epoch, err := store.Epoch(pctx)
				queries.Add(1)
				if err == nil && epoch > last {
					if last >= 0 {
						sightings.reply(uint64(epoch), time.Now())
						// Learn what changed, as a real poller must.
						_, _ = store.State(pctx)
						queries.Add(2)
					}
					last = epoch
				}
				select {
				case <-pctx.Done():
					return
				case <-t.C:
				}
			}
		})
	}
	// Every poller has polled once when one interval has passed.
	if err := retry.Sleep(ctx, time.Until(first.Add(interval+interval/10))); err != nil {
		return Polling{}, err
	}

	x0, err := e.dbXacts(ctx)
	if err != nil {
		return Polling{}, err
	}
	stopProfile, err := e.profile(fmt.Sprintf("polling-%d", n))
	if err != nil {
		return Polling{}, err
	}
	defer stopProfile()
	q0, t0, mark := queries.Load(), time.Now(), e.cpuNow(ctx)
	var flips [][]time.Duration
	missing := 0
	for range e.opts.Flips {
		if err := retry.Sleep(ctx, time.Duration(randN(int64(interval)))); err != nil {
			return Polling{}, err
		}
		done := sightings.arm(uint64(e.epoch + 1))
		committed, err := e.flip(ctx)
		if err != nil {
			return Polling{}, err
		}
		t := time.NewTimer(3*interval + 10*time.Second)
		select {
		case <-done:
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return Polling{}, ctx.Err()
		}
		t.Stop()
		times := sightings.take()
		lat := make([]time.Duration, 0, len(times))
		for _, at := range times {
			lat = append(lat, max(at.Sub(committed), 0))
		}
		flips = append(flips, lat)
		missing += n - len(lat)
	}
	elapsed := time.Since(t0).Seconds()
	q1, cpu := queries.Load(), mark.per(ctx, e.opts.Flips)
	stopProfile()
	x1, err := e.dbXacts(ctx)
	if err != nil {
		return Polling{}, err
	}
	p := Polling{
		Measured:         summarize(flips, missing),
		QueriesPerSecond: float64(q1-q0) / elapsed,
		DBXactPerSecond:  float64(x1-x0) / elapsed,
	}
	p.CPU = cpu
	progress(e.opts, "bench: %d pollers: p50 %.0fms p99 %.0fms (commit → last poller saw it); %.0f queries/s", n, p.PerFlip.P50MS, p.PerFlip.P99MS, p.QueriesPerSecond)
	return p, nil
}

// dbXacts reads the database's transaction count from pg_stat_database.
func (e *env) dbXacts(ctx context.Context) (int64, error) {
	var n int64
	// A fresh snapshot of the statistics, not the one cached by an
	// earlier read on this session.
	_, _ = e.store.DB().ExecContext(ctx, `SELECT pg_stat_clear_snapshot()`)
	err := e.store.DB().GetContext(ctx, &n, `SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()`)
	return n, err
}
