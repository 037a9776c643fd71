package schema_test

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/internal/wire"
	"github.com/phasecast/phasecast/schema"
)

// Defect "The runner holds the epoch row FOR UPDATE while the operator's
// precondition SQL runs": a slow precondition blocked every status write
// and store sync, so after a lease every agent fenced.

// slowPrecondition is how long the precondition of releaseSlow sleeps.
const slowPrecondition = 3 * time.Second

// releaseSlow is releaseL with a precondition as slow as a full scan of a
// big table.
const releaseSlow = `
release: L
preconditions:
  - name: a full scan
    sql: SELECT 1 WHERE pg_sleep(3) IS NULL
removed:
  - table: APP.instances
    columns: [name, display_name]
`

// TestSlowPreconditionDoesNotBlockStatusWrites: while the runner re-runs a
// slow precondition before contracting, agents' status writes
// (RecordStatuses, the broadcaster's path) and store syncs (SyncAgent, a
// fenced agent's path) go through promptly.
func TestSlowPreconditionDoesNotBlockStatusWrites(t *testing.T) {
	t.Parallel()
	b, epoch := setupAckedRelease(t, "a", releaseSlow)
	b.agent(agentSpec{id: "b", drained: epoch, releases: []string{"L"}})

	status := func(id string) wire.Status {
		return testenv.Credentials(wire.Status{V: wire.StatusVersion, Kind: wire.KindStatus, AgentID: id, Service: "svc-" + id, Host: "host-" + id,
			PID: 4242, Version: "v1", Releases: []string{"L"}, Seq: b.seq.Add(1), AppliedEpoch: epoch,
			DrainedEpoch: epoch, SentAt: time.Now()})
	}
	// Agent a's statuses go the broadcaster's way, agent b's through the
	// store, each in a loop of its own, so that neither waits for the
	// other: each call's latency is its own.
	paths := []struct {
		name  string
		write func(ctx context.Context) error
		calls atomic.Int64
		worst atomic.Int64 // nanoseconds
	}{
		{name: "RecordStatuses", write: func(ctx context.Context) error {
			_, _, err := b.store.RecordStatuses(ctx, []wire.Status{status("a")}, time.Minute)
			return err
		}},
		{name: "SyncAgent", write: func(ctx context.Context) error {
			_, err := b.store.SyncAgent(ctx, status("b"), time.Minute)
			return err
		}},
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i := range paths {
		p := &paths[i]
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				case <-time.After(20 * time.Millisecond):
				}
				ctx, cancel := context.WithTimeout(b.ctx, 30*time.Second)
				start := time.Now()
				err := p.write(ctx)
				took := time.Since(start)
				cancel()
				if err != nil {
					t.Errorf("%s: %v", p.name, err)
					return
				}
				p.calls.Add(1)
				if int64(took) > p.worst.Load() {
					p.worst.Store(int64(took))
				}
			}
		})
	}

	res, err := b.store.Contract(b.ctx, "L", fast(schema.ContractOptions{}))
	close(stop)
	wg.Wait()
	require.NoError(t, err)
	require.Equal(t, schema.OutcomeComplete, res.Outcome)
	for i := range paths {
		t.Logf("%s: %d calls, slowest %s", paths[i].name, paths[i].calls.Load(), time.Duration(paths[i].worst.Load()))
	}
	for i := range paths {
		p := &paths[i]
		require.Greater(t, p.calls.Load(), int64(10), p.name)
		require.Less(t, time.Duration(p.worst.Load()), slowPrecondition/3, "%s waited for the runner's precondition", p.name)
	}
	require.Equal(t, []string{"instances.id", "instances.common_name"}, b.columns())
}

// TestRollbackDuringRunnerChecksIsNoticed: the checks the runner makes
// before it takes the locks do not hold the release; a rollback that
// lands while they run is seen under the locks, and nothing is dropped.
func TestRollbackDuringRunnerChecksIsNoticed(t *testing.T) {
	t.Parallel()
	b, _ := setupAckedRelease(t, "a", releaseSlow)
	before := b.columns()

	acked := make(chan struct{})
	var once sync.Once
	done := make(chan error, 1)
	go func() {
		_, err := b.store.Contract(b.ctx, "L", fast(schema.ContractOptions{
			Progress: func(p schema.Progress) {
				if p.Live == 1 && p.Acked == 1 {
					once.Do(func() { close(acked) })
				}
			},
		}))
		done <- err
	}()
	<-acked
	// The wait is over; the runner now re-runs the slow precondition.
	require.Eventually(t, func() bool {
		var running bool
		err := b.db.GetContext(b.ctx, &running, `SELECT EXISTS (SELECT 1 FROM pg_stat_activity
			WHERE state = 'active' AND query LIKE 'SELECT 1 WHERE pg_sleep(3)%' AND pid <> pg_backend_pid())`)
		return err == nil && running
	}, 5*time.Second, 10*time.Millisecond)
	start := time.Now()
	_, err := b.store.Rollback(b.ctx, "L", schema.FlipOptions{Actor: "test"})
	require.NoError(t, err, "the rollback lands while the runner checks")
	require.Less(t, time.Since(start), slowPrecondition/3, "the rollback waited for the runner's precondition")

	err = <-done
	require.ErrorIs(t, err, schema.ErrRefused)
	require.Equal(t, before, b.columns(), "nothing dropped")
	require.Equal(t, phase.Migrate, b.phase("L"))
}
