package integration

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/agent"
	"github.com/phasecast/phasecast/broadcaster"
	"github.com/phasecast/phasecast/schema"
)

// TestStopWithGuardsOpenKeepsTheLease is the rolling deploy: SIGTERM
// arrives while a request is in flight, the service stops its agent, and
// release L is flipped to contract and its runner started meanwhile. The
// request holds its guard for three lease lengths: Stop must keep the
// lease alive until the guard exits, so the runner waits and the request
// still succeeds on its old snapshot; then Stop says goodbye and the
// runner drops.
func TestStopWithGuardsOpenKeepsTheLease(t *testing.T) {
	t.Parallel()
	const lease = 1500 * time.Millisecond
	for _, withDB := range []bool{false, true} {
		t.Run(map[bool]string{false: "WithoutDB", true: "WithDB"}[withDB], func(t *testing.T) {
			t.Parallel()
			e := e2eSetup(t)
			e.createInstances()
			e.apply(e2eReleaseL)
			e.startBroadcaster(true, func(c *broadcaster.Config) { c.LeaseDuration = lease })
			cfg := e.agentConfig("nova-draining", withDB)
			cfg.InitialLease = lease
			a := e.startAgent(cfg)
			migrate := e.toMigrate()
			e2eWaitFor(t, e2eWait, "the agent to apply migrate", func() bool { return a.Snapshot().Epoch() == migrate })

			// The request in flight, on the migrate snapshot.
			g, err := a.Enter()
			require.NoError(t, err)
			exited := false
			defer func() {
				if !exited {
					g.Exit()
				}
			}()
			query := "SELECT " + g.Snapshot().SelectList(a.Table(e.table)) + " FROM " + schema.QuoteTable(e.table) + " LIMIT 1"
			require.Contains(t, query, `"name"`)

			// SIGTERM: the service stops its agent.
			stopCh := make(chan error, 1)
			go func() {
				ctx, cancel := context.WithTimeout(e.ctx, 30*time.Second)
				defer cancel()
				stopCh <- a.Stop(ctx)
			}()
			stopped := stopCh
			e2eWaitFor(t, e2eWait, "Stop to refuse new work", func() bool {
				g2, err := a.Enter()
				if err == nil {
					g2.Exit()
				}
				return err != nil
			})

			// The deploy script goes on: contract, and the runner.
			contract := e.flipChecked("L")
			runCtx, cancelRun := context.WithCancel(e.ctx)
			ran := make(chan error, 1)
			runDone := make(chan struct{})
			var res *schema.ContractResult
			go func() {
				defer close(runDone)
				r, err := e.store.Contract(runCtx, "L", schema.ContractOptions{Timeout: 30 * time.Second, PollInterval: 20 * time.Millisecond, LeaderWithin: 5 * time.Second, Actor: "test"})
				res = r
				ran <- err
			}()
			t.Cleanup(func() { cancelRun(); <-runDone })

			hold := time.After(3 * lease)
			stoppedEarly, ranOut := "", ""
			reported := false
		holding:
			for {
				select {
				case err := <-ran:
					require.FailNow(t, "the runner finished while a guard was open", "error %v, outcome %v, columns now %v; %s; lease ran out: %s", err, res.Outcome, e.columns("instances"), stoppedEarly, ranOut)
				case err := <-stopped:
					stoppedEarly = fmt.Sprintf("Stop returned %v", err)
					stopped = nil // and see what the runner does
				case <-hold:
					break holding
				case <-time.After(50 * time.Millisecond):
					row, ok := e.agentRow(a.ID())
					require.True(t, ok)
					if !row.Live() && ranOut == "" {
						ranOut = fmt.Sprintf("%+v", row)
					}
					reported = reported || (row.AppliedEpoch == contract && row.Inflight == 1 && row.DrainedEpoch < contract)
				}
			}
			require.Empty(t, stoppedEarly, "Stop returned while a guard was open")
			require.Empty(t, ranOut, "the lease of an agent stopping with a guard open ran out")
			require.True(t, reported, "the statuses while stopping showed the contract applied and the guard on the old snapshot")
			rows, err := e.db.QueryContext(e.ctx, query)
			require.NoError(t, err, "the request in flight at SIGTERM")
			require.True(t, rows.Next())
			require.NoError(t, rows.Close())

			g.Exit()
			exited = true
			select {
			case err := <-stopped:
				require.NoError(t, err)
			case <-time.After(e2eWait):
				require.FailNow(t, "Stop did not return after the last guard exited")
			}
			select {
			case err := <-ran:
				require.NoError(t, err)
			case <-time.After(e2eWait):
				require.FailNow(t, "the runner did not proceed after the guard exited")
			}
			require.Equal(t, schema.OutcomeComplete, res.Outcome, fmt.Sprintf("%+v", res))
			require.Equal(t, []string{"id", "host", "common_name"}, e.columns("instances"))
			// Stop returns once the goodbye is published; the broadcaster
			// records it in its next batch.
			e2eWaitFor(t, e2eWait, "the goodbye to end the lease once the guard had exited", func() bool {
				row, ok := e.agentRow(a.ID())
				return ok && !row.Live()
			})
			_, err = a.Enter()
			require.ErrorIs(t, err, agent.ErrStale)
		})
	}
}
