package agent

import (
	"fmt"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/wire"
)

// The hot path, without servers: snapshots come from newSnapshot through
// newTestAgent.

var (
	sinkSnapshot *Snapshot
	sinkStrings  []string
	sinkString   string
	sinkBool     bool
)

func BenchmarkSnapshot(b *testing.B) {
	a := newTestAgent(b, stateL(1, phase.Contract))
	b.ReportAllocs()
	for b.Loop() {
		sinkSnapshot = a.Snapshot()
	}
}

func BenchmarkColumns(b *testing.B) {
	a := newTestAgent(b, stateL(1, phase.Contract))
	inst := a.Table("instances")
	s := a.Snapshot()
	b.ReportAllocs()
	for b.Loop() {
		sinkStrings = s.Columns(inst)
	}
}

func BenchmarkColumnsSelectList(b *testing.B) {
	a := newTestAgent(b, stateL(1, phase.Contract))
	inst := a.Table("instances")
	s := a.Snapshot()
	b.ReportAllocs()
	for b.Loop() {
		sinkString = s.SelectList(inst)
	}
}

// BenchmarkRemoved is the lookup by name, for any table: two string
// hashes. BenchmarkColumnRemoved is the hot-path form, resolved once.
func BenchmarkRemoved(b *testing.B) {
	a := newTestAgent(b, stateL(1, phase.Contract))
	s := a.Snapshot()
	b.ReportAllocs()
	for b.Loop() {
		sinkBool = s.Removed("instances", "name")
	}
}

func BenchmarkColumnRemoved(b *testing.B) {
	a := newTestAgent(b, stateL(1, phase.Contract))
	name := a.Column("instances", "name")
	s := a.Snapshot()
	b.ReportAllocs()
	for b.Loop() {
		sinkBool = s.ColumnRemoved(name)
	}
}

// Baselines, run alongside so that ratios compare like with like on the
// machine at hand: an atomic pointer load (what Snapshot is), a slice
// index (what Columns and ColumnRemoved are), a map lookup by string
// (what Removed is, twice) and an atomic increment-decrement pair (the
// least an Enter/Exit can cost).

var (
	baselinePtr   atomic.Pointer[Snapshot]
	baselineSlice = []bool{false, true, false, true}
	baselineMap   = map[string]bool{"instances": true, "flavors": false}
	baselineCount atomic.Int64
	baselineIndex = 1
)

func BenchmarkBaselineAtomicLoad(b *testing.B) {
	baselinePtr.Store(&Snapshot{})
	for b.Loop() {
		sinkSnapshot = baselinePtr.Load()
	}
}

func BenchmarkBaselineSliceIndex(b *testing.B) {
	for b.Loop() {
		sinkBool = baselineSlice[baselineIndex]
	}
}

func BenchmarkBaselineMapLookup(b *testing.B) {
	for b.Loop() {
		sinkBool = baselineMap["instances"]
	}
}

func BenchmarkBaselineAtomicAddPair(b *testing.B) {
	for b.Loop() {
		baselineCount.Add(1)
		baselineCount.Add(-1)
	}
}

// BenchmarkTickClock is the clock read every Enter makes (ticks: the
// time-stamp counter where the kernel keeps its clock on it, see
// clock.go), the part of Enter/Exit beyond the atomic pair that a
// paused process needs; its cost is the CPU's, and varies between
// machines more than the atomic pair does.
func BenchmarkTickClock(b *testing.B) {
	var sum int64
	for b.Loop() {
		sum += ticks()
	}
	sinkTicks = sum
}

var sinkTicks int64

// BenchmarkBaselineAtomicAddPairParallel is the reference for
// BenchmarkEnterExitParallel: every core incrementing and decrementing one
// shared counter, as guards on one snapshot do.
func BenchmarkBaselineAtomicAddPairParallel(b *testing.B) {
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			baselineCount.Add(1)
			baselineCount.Add(-1)
		}
	})
}

func BenchmarkEnterExit(b *testing.B) {
	a := newTestAgent(b, stateL(1, phase.Contract))
	b.ReportAllocs()
	for b.Loop() {
		g, err := a.Enter()
		if err != nil {
			b.Fatal(err)
		}
		g.Exit()
	}
}

// BenchmarkEnterExitParallel runs guards on every core while a new
// snapshot is swapped in about every 100µs and the drainer acknowledges
// each. The writer is not a goroutine of its own: with every core busy in
// RunParallel it would be starved (on two cores it managed a swap every
// ~30ms), so whichever worker notices that 100µs have passed does the swap.
// Its cost is in ns/op, spread over the iterations in between.
func BenchmarkEnterExitParallel(b *testing.B) {
	a := newTestAgent(b, stateL(1, phase.Contract))
	runDrainer(b, a)
	const every = 100 * time.Microsecond
	var (
		epoch    atomic.Int64
		swapping atomic.Bool
		lastSwap atomic.Int64 // UnixNano
	)
	epoch.Store(1)
	lastSwap.Store(time.Now().UnixNano())
	maybeSwap := func() {
		if time.Now().UnixNano()-lastSwap.Load() < int64(every) || !swapping.CompareAndSwap(false, true) {
			return
		}
		e := epoch.Add(1)
		p := phase.Contract
		if e%2 == 0 {
			p = phase.Migrate
		}
		a.apply(stateL(e, p))
		lastSwap.Store(time.Now().UnixNano())
		swapping.Store(false)
	}
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for i := 0; pb.Next(); i++ {
			if i%256 == 0 {
				maybeSwap()
			}
			g, err := a.Enter()
			if err != nil {
				b.Error(err)
				return
			}
			g.Exit()
		}
	})
	b.StopTimer()
	last := epoch.Load()
	b.ReportMetric(float64(last-1), "swaps")
	require.Eventually(b, func() bool { return a.drained.Load() == last }, 5*time.Second, time.Millisecond)
}

// BenchmarkApplyState50Releases decodes a 50-release state message and
// applies it (snapshot build and swap): the cost of one flip for one agent.
func BenchmarkApplyState50Releases(b *testing.B) {
	st := wire.State{Epoch: 1}
	for i := range 50 {
		p := []phase.Phase{phase.Expand, phase.Migrate, phase.Contract, phase.Contracting, phase.Complete}[i%5]
		st.Releases = append(st.Releases, wire.Release{Name: fmt.Sprintf("R%02d", i), Phase: p, Removals: []wire.Removal{
			{Table: "instances", Columns: []string{fmt.Sprintf("col_%d", i)}},
			{Table: fmt.Sprintf("nova.table_%d", i), Columns: []string{"a", "b", "c"}},
			{Table: fmt.Sprintf("legacy_%d", i)},
		}})
	}
	body, err := wire.EncodeState(st)
	require.NoError(b, err)
	a := newTestAgent(b, stateL(1, phase.Contract))
	epoch := int64(1)
	b.ReportAllocs()
	b.SetBytes(int64(len(body)))
	for b.Loop() {
		got, err := wire.DecodeState(body)
		if err != nil {
			b.Fatal(err)
		}
		epoch++
		got.Epoch = epoch
		if !a.apply(&got) {
			b.Fatal("not applied")
		}
	}
}

// BenchmarkGuardPairRatio measures Enter/Exit against the baseline pair
// in alternating blocks and reports the median ratio of neighbouring
// blocks (x-baseline): on a machine that other work keeps busy, a block
// the scheduler interrupted is an outlier the median drops, where a
// whole run's ns/op would take it in. Each iteration is one pair of
// blocks; run it with -benchtime 3000x.
func BenchmarkGuardPairRatio(b *testing.B) {
	a := newTestAgent(b, stateL(1, phase.Contract))
	const block = 20000
	var ratios []float64
	for b.Loop() {
		t0 := time.Now()
		for range block {
			baselineCount.Add(1)
			baselineCount.Add(-1)
		}
		t1 := time.Now()
		for range block {
			g, err := a.Enter()
			if err != nil {
				b.Fatal(err)
			}
			g.Exit()
		}
		ratios = append(ratios, float64(time.Since(t1))/float64(t1.Sub(t0)))
	}
	slices.Sort(ratios)
	b.ReportMetric(ratios[len(ratios)/2], "x-baseline")
}
