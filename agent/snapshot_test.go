package agent

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/wire"
)

// These tests need no server: snapshots are built with newSnapshot.

func TestSnapshotRemoved(t *testing.T) {
	reg := newRegistry(testTables())
	for _, tc := range []struct {
		phase phase.Phase
		hides bool
	}{
		{phase.Expand, false},
		{phase.Migrate, false},
		{phase.Contract, true},
		{phase.Contracting, true},
		{phase.Complete, true},
	} {
		t.Run(string(tc.phase), func(t *testing.T) {
			s := newSnapshot(stateL(7, tc.phase), reg, nil)
			require.Equal(t, int64(7), s.Epoch())
			require.Equal(t, tc.hides, s.Removed("instances", "name"))
			require.Equal(t, tc.hides, s.Removed("instances", "display_name"))
			require.False(t, s.Removed("instances", "common_name"))
			require.False(t, s.Removed("instances", ""), "columns removed, not the table")
			require.Equal(t, tc.hides, s.Removed("legacy_flavors", "anything"))
			require.Equal(t, tc.hides, s.Removed("legacy_flavors", ""))
			require.False(t, s.Removed("flavors", "name"))
			p, ok := s.Phase("L")
			require.True(t, ok)
			require.Equal(t, tc.phase, p)
			_, ok = s.Phase("M")
			require.False(t, ok)
		})
	}
}

func TestSnapshotHidesUnknownReleases(t *testing.T) {
	// The agent's code was built for L only (Config.Releases), but a
	// release it does not know still hides its removals: the safe side.
	reg := newRegistry(testTables())
	st := &wire.State{Epoch: 3, Releases: []wire.Release{
		{Name: "L", Phase: phase.Migrate, Removals: []wire.Removal{{Table: "instances", Columns: []string{"name"}}}},
		{Name: "M", Phase: phase.Contract, Removals: []wire.Removal{{Table: "instances", Columns: []string{"display_name"}}}},
		{Name: "N", Phase: phase.Complete, Removals: []wire.Removal{{Table: "nova.instances", Columns: []string{"host"}}, {Table: "Billing.invoices"}}},
	}}
	s := newSnapshot(st, reg, nil)
	inst := reg.index["instances"]
	require.False(t, s.Removed("instances", "name"))
	require.True(t, s.Removed("instances", "display_name"))
	require.Equal(t, []string{"id", "name", "common_name"}, s.Columns(inst))
	require.Equal(t, `"id", "name", "common_name"`, s.SelectList(inst))
	require.Equal(t, `"id", "Name", "display name"`, s.SelectList(reg.index["nova.instances"]))
	require.True(t, s.TableRemoved(reg.index["Billing.invoices"]))
	require.Equal(t, "", s.SelectList(reg.index["Billing.invoices"]))
	require.False(t, s.TableRemoved(inst))
}

func TestSnapshotMergesRemovals(t *testing.T) {
	reg := newRegistry(testTables())
	st := &wire.State{Epoch: 3, Releases: []wire.Release{
		{Name: "A", Phase: phase.Contract, Removals: []wire.Removal{{Table: "legacy_flavors", Columns: []string{"flavor"}}}},
		{Name: "B", Phase: phase.Contract, Removals: []wire.Removal{{Table: "legacy_flavors"}}},
		{Name: "C", Phase: phase.Contract, Removals: []wire.Removal{{Table: "legacy_flavors", Columns: []string{"id"}}}},
	}}
	s := newSnapshot(st, reg, nil)
	require.True(t, s.TableRemoved(reg.index["legacy_flavors"]))
	require.True(t, s.Removed("legacy_flavors", "unlisted"), "the whole table goes, whatever else removes columns of it")
}

func TestSnapshotSharesUntouchedTables(t *testing.T) {
	reg := newRegistry(testTables())
	a := newSnapshot(stateL(1, phase.Contract), reg, nil)
	b := newSnapshot(stateL(2, phase.Contract), reg, nil)
	nova := reg.index["nova.instances"]
	require.Same(t, &a.Columns(nova)[0], &reg.columns[nova.index()][0])
	require.Same(t, &a.Columns(nova)[0], &b.Columns(nova)[0])
}

func TestTableRef(t *testing.T) {
	a, err := New(Config{Insecure: true, Service: "svc", Tables: testTables()})
	require.NoError(t, err)
	require.PanicsWithValue(t, `agent: table "flavors" is not registered in Config.Tables (registered: ["Billing.invoices" "instances" "legacy_flavors" "nova.instances"])`,
		func() { a.Table("flavors") })
	s := newSnapshot(stateL(1, phase.Expand), a.reg, nil)
	require.Panics(t, func() { s.Columns(TableRef{}) })
	require.Equal(t, `"id", "flavor"`, s.SelectList(a.Table("legacy_flavors")))
}

func TestGuardBeforeStart(t *testing.T) {
	a, err := New(Config{Insecure: true, Service: "svc"})
	require.NoError(t, err)
	require.Nil(t, a.Snapshot())
	g, err := a.Enter()
	require.ErrorIs(t, err, ErrStale)
	require.Nil(t, g.Snapshot())
	g.Exit() // the zero guard: nothing happens
	require.Equal(t, int64(1), a.Stats().StaleRefusals)
}

func TestGuardExitTwicePanics(t *testing.T) {
	a := newTestAgent(t, stateL(1, phase.Expand))
	g, err := a.Enter()
	require.NoError(t, err)
	g.Exit()
	require.Panics(t, g.Exit)
}

// TestDrainUnderSwaps hammers Enter/Exit from many goroutines while states
// are swapped in, and checks the acknowledgement's promise: drained_epoch
// never passes the epoch of a guard that is still open.
func TestDrainUnderSwaps(t *testing.T) {
	a := newTestAgent(t, stateL(1, phase.Expand))
	runDrainer(t, a)

	var stop atomic.Bool
	var violations, entered atomic.Int64
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for !stop.Load() {
				g, err := a.Enter()
				if err != nil {
					t.Error(err)
					return
				}
				entered.Add(1)
				for range 3 {
					if a.drained.Load() > g.Snapshot().Epoch() {
						violations.Add(1)
					}
				}
				g.Exit()
			}
		})
	}
	epoch := int64(1)
	deadline := time.Now().Add(500 * time.Millisecond)
	for time.Now().Before(deadline) {
		epoch++
		p := phase.Migrate
		if epoch%2 == 0 {
			p = phase.Contract
		}
		a.apply(stateL(epoch, p))
		time.Sleep(50 * time.Microsecond)
	}
	stop.Store(true)
	wg.Wait()
	require.Zero(t, violations.Load())
	require.Positive(t, entered.Load())
	require.Eventually(t, func() bool { return a.drained.Load() == epoch }, 5*time.Second, time.Millisecond,
		"all guards exited, so the last epoch drains")
	require.Zero(t, a.Stats().Inflight)
}
