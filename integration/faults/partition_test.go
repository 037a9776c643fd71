package faults

import (
	"database/sql"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/agent"
	"github.com/phasecast/phasecast/internal/faultproxy"
	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/testenv"
)

// fenceWatch records when an agent first reports itself fenced after the
// watch began, polling every 2 ms (so the time it records is at most 2 ms
// late: never early).
type fenceWatch struct {
	mu   sync.Mutex
	at   time.Time
	stop chan struct{}
	done chan struct{}
}

func watchFence(t *testing.T, a *agent.Agent) *fenceWatch {
	w := &fenceWatch{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		tick := time.NewTicker(2 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-w.stop:
				return
			case <-tick.C:
			}
			if a.Stats().Fenced {
				w.mu.Lock()
				w.at = time.Now()
				w.mu.Unlock()
				return
			}
		}
	}()
	t.Cleanup(w.close)
	return w
}

func (w *fenceWatch) close() {
	select {
	case <-w.stop:
	default:
		close(w.stop)
	}
	<-w.done
}

func (w *fenceWatch) fencedAt() time.Time {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.at
}

// TestPartitionedAgent: one agent's broker traffic is black-holed just
// before a flip to contract, while two other agents and the runner carry
// on. The runner never counts the partitioned agent as acknowledged: it
// proceeds only once that agent acknowledged through the store, or, when it
// cannot reach the store either, once its lease expired on the database
// clock; the agent fenced itself before that moment. Afterwards it never
// runs a query naming a dropped column: with a database it re-syncs, without
// one it refuses work with ErrStale until it hears from the broker again.
func TestPartitionedAgent(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		// db: the partitioned agent has a store connection; storeCut: the
		// partition cuts it too (connections reset, new ones refused);
		// storeBlackhole: the partition swallows its store traffic.
		db, storeCut, storeBlackhole bool
	}{
		{name: "without a database"},
		{name: "with a database", db: true},
		{name: "with a database it cannot reach", db: true, storeCut: true},
		{name: "with a database black-holed", db: true, storeBlackhole: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := setup(t)
			e.startBroadcaster(nil)
			amqpHost, err := faultproxy.HostPort(testenv.AMQPURL())
			require.NoError(t, err)
			amqpProxy := faultproxy.Start(t, amqpHost)
			pgHost, err := faultproxy.HostPort(testenv.DatabaseURL())
			require.NoError(t, err)
			pgProxy := faultproxy.Start(t, pgHost)

			agentDB := e.agentDB(4)
			svcDB := e.serviceDB("faults-partition", 6)
			cfg := e.agentConfig("lonely-0", nil)
			cfg.AMQPURL = amqpProxy.URL(testenv.AMQPURL())
			if tc.db {
				cfg.DB = agentDB
				if tc.storeCut || tc.storeBlackhole {
					viaProxy, err := sql.Open("postgres", pgProxy.URL(testenv.DatabaseURL()))
					require.NoError(t, err)
					t.Cleanup(func() { viaProxy.Close() })
					cfg.DB = viaProxy
				}
			}
			lonely := e.startAgent(cfg)
			others := e.startAgents([]agent.Config{e.agentConfig("peer-0", agentDB), e.agentConfig("peer-1", nil)})
			lonelyTraffic := e.runTraffic(lonely, svcDB, 2)
			var peerTraffic []*traffic
			for _, a := range others {
				peerTraffic = append(peerTraffic, e.runTraffic(a, svcDB, 2))
			}
			all := append([]*agent.Agent{lonely}, others...)
			e.waitDrained(e.flip(phase.Migrate), ids(all)...)

			fence := watchFence(t, lonely)
			amqpProxy.Blackhole(true)
			switch {
			case tc.storeCut:
				pgProxy.Refuse(true)
				pgProxy.Cut()
			case tc.storeBlackhole:
				pgProxy.Blackhole(true)
			}
			partitioned := time.Now()
			epoch := e.flip(phase.Contract)
			r := awaitRunner(t, e.runnerAsync(nil), 2*wait)
			queriesBefore, refusedBefore := lonelyTraffic.queries.Load(), lonelyTraffic.refused.Load()

			// Before healing: nothing of the lonely agent's can have
			// reached the store since the runner decided.
			decided, _ := e.phaseAt(phase.Contracting)
			acks := e.ackTimes(epoch)
			reachable := tc.db && !tc.storeCut && !tc.storeBlackhole
			if reachable {
				// It acknowledged through the store: counted, honestly.
				e.requireDroppedAfterAcks(r, ids(all))
				require.True(t, acks[lonely.ID()].After(partitioned), "the acknowledgement came through the store during the partition")
				require.Positive(t, lonely.Stats().Fencings, "the agent fenced and re-synced through the store")
				figure(t, "acked_through_store_after", acks[lonely.ID()].Sub(partitioned))
			} else {
				e.requireDroppedAfterAcks(r, ids(others))
				_, acked := acks[lonely.ID()]
				require.False(t, acked, "the partitioned agent cannot have acknowledged")
				expiry := e.lastLease(lonely.ID())
				require.False(t, decided.Before(expiry), "the runner decided at %s, before the partitioned agent's lease expired at %s", decided, expiry)
				fencedAt := fence.fencedAt()
				require.False(t, fencedAt.IsZero(), "the partitioned agent never fenced itself")
				require.True(t, fencedAt.Before(expiry), "the agent fenced at %s, after its lease expired in the store at %s", fencedAt, expiry)
				figure(t, "fenced_before_store_expiry", expiry.Sub(fencedAt))
				figure(t, "runner_after_store_expiry", decided.Sub(expiry))
			}
			figure(t, "runner_waited", r.res.Waited)

			// After the drop and before healing: work re-synced (store
			// reachable), or not run at all.
			time.Sleep(500 * time.Millisecond)
			ranAfterDrop := lonelyTraffic.queries.Load() - queriesBefore
			if !reachable {
				require.Zero(t, ranAfterDrop, "the fenced agent ran work after the runner dropped")
			}
			figure(t, "queries_after_drop_before_heal", ranAfterDrop)
			figure(t, "refused_after_drop_before_heal", lonelyTraffic.refused.Load()-refusedBefore)
			amqpProxy.Blackhole(false)
			pgProxy.Blackhole(false)
			pgProxy.Refuse(false)
			healed := time.Now()
			complete, _ := e.phaseAt(phase.Complete)
			require.False(t, complete.IsZero())
			waitFor(t, wait, "the partitioned agent to catch up", func() bool {
				st := lonely.Stats()
				return !st.Fenced && st.DrainedEpoch > epoch
			})
			figure(t, "caught_up_after_heal", time.Since(healed))
			time.Sleep(300 * time.Millisecond)
			queries, failed, refused, failures := totals(lonelyTraffic)
			require.Zero(t, failed, "the partitioned agent's queries failed: %v", failures)
			require.Positive(t, queries)
			// With a black-holed store the fenced agent's work waits for a
			// re-sync lib/pq cannot abandon (docs/RELIABILITY.md), at most
			// 5 s before it is refused; this partition heals sooner, so it
			// is neither run nor refused.
			if !tc.db || tc.storeCut {
				require.Positive(t, refused, "a fenced agent that cannot re-sync refuses work")
				require.Positive(t, lonely.Stats().StaleRefusals)
			}
			pq, pfailed, _, pfailures := totals(peerTraffic...)
			require.Zero(t, pfailed, "queries failed: %v", pfailures)
			require.Positive(t, pq)
			figure(t, "queries", queries+pq)
			figure(t, "queries_failed", failed+pfailed)
			figure(t, "refused", refused)
			figure(t, "stale_refusals", lonely.Stats().StaleRefusals)
		})
	}
}
