package agent

import (
	"slices"
	"sort"
	"strings"
	"sync/atomic"

	"github.com/lib/pq"

	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/wire"
)

// TableRef is a registered table, resolved once by Agent.Table so that
// Snapshot.Columns and Snapshot.SelectList are a slice index on the hot
// path. The zero TableRef names no table.
type TableRef struct {
	i int32 // index into the registry + 1; 0 is the zero value
}

// ColumnRef is one column of a registered table, resolved once by
// Agent.Column so that Snapshot.ColumnRemoved is a slice index on the hot
// path, where Removed hashes two strings. The zero ColumnRef names no
// column.
type ColumnRef struct {
	i int32 // index into the registry's flattened columns + 1; 0 is the zero value
}

// registry holds the tables of Config.Tables, in a fixed order that
// TableRef indexes.
type registry struct {
	names   []string
	columns [][]string // as registered, in the service's order
	selects []string   // SelectList of all columns, shared while none is removed
	index   map[string]TableRef
	colBase []int // per table: the ColumnRef index of its first column
	ncols   int   // every registered column of every table
}

func newRegistry(tables map[string][]string) *registry {
	r := &registry{index: make(map[string]TableRef, len(tables))}
	for _, name := range sortedKeys(tables) {
		cols := slices.Clone(tables[name])
		r.index[name] = TableRef{i: int32(len(r.names) + 1)}
		r.names = append(r.names, name)
		r.columns = append(r.columns, cols)
		r.selects = append(r.selects, selectList(cols))
		r.colBase = append(r.colBase, r.ncols)
		r.ncols += len(cols)
	}
	return r
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// selectList quotes each column and joins them with ", ".
func selectList(cols []string) string {
	var b strings.Builder
	for i, c := range cols {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(pq.QuoteIdentifier(c))
	}
	return b.String()
}

// Snapshot is the versioning state at one epoch, as one service sees it.
// It is immutable: every method is safe for concurrent use, and what it
// returns never changes. A newer state is a new Snapshot.
type Snapshot struct {
	epoch   int64
	phases  map[string]phase.Phase
	removed map[string]removedTable // table, as spelled in manifests → what is hidden

	// Per registered table, indexed by TableRef.i-1.
	columns [][]string
	selects []string
	gone    []bool

	// Per registered column, indexed by ColumnRef.i-1.
	colGone []bool

	// drain is the agent's drainer wake-up channel (1-buffered).
	drain chan<- struct{}

	// retired is set once a newer snapshot has replaced this one; from
	// then on the last guard to exit wakes the drainer.
	retired atomic.Bool

	// inflight counts the guards pinned to this snapshot. It sits on a
	// cache line of its own: every Enter and Exit writes it, and the
	// read-only fields above must not bounce between cores with it.
	_        [64]byte
	inflight atomic.Int64
	_        [56]byte
}

// removedTable is what the releases that hide removals say about one table.
type removedTable struct {
	whole   bool                // the table itself is removed
	columns map[string]struct{} // removed columns, when not whole
}

// newSnapshot builds the snapshot of st for the tables in reg. It is the
// only constructor: the agent and the tests both go through it.
func newSnapshot(st *wire.State, reg *registry, drain chan<- struct{}) *Snapshot {
	s := &Snapshot{
		epoch:  st.Epoch,
		phases: make(map[string]phase.Phase, len(st.Releases)),
		drain:  drain,
	}
	for _, rel := range st.Releases {
		s.phases[rel.Name] = rel.Phase
		// Every release whose phase hides removals counts, whether or not
		// this service's code knows the release: hiding a column the code
		// could still name is the safe side, and the runner separately
		// refuses to count an ack from an agent that does not know it.
		if !rel.Phase.HidesRemoved() {
			continue
		}
		for _, rm := range rel.Removals {
			if s.removed == nil {
				s.removed = make(map[string]removedTable)
			}
			t := s.removed[rm.Table]
			if len(rm.Columns) == 0 {
				t.whole, t.columns = true, nil
			} else if !t.whole {
				if t.columns == nil {
					t.columns = make(map[string]struct{}, len(rm.Columns))
				}
				for _, c := range rm.Columns {
					t.columns[c] = struct{}{}
				}
			}
			s.removed[rm.Table] = t
		}
	}
	n := len(reg.names)
	s.columns = make([][]string, n)
	s.selects = make([]string, n)
	s.gone = make([]bool, n)
	s.colGone = make([]bool, reg.ncols)
	for i, name := range reg.names {
		t, hit := s.removed[name]
		if hit {
			for j, c := range reg.columns[i] {
				_, out := t.columns[c]
				s.colGone[reg.colBase[i]+j] = t.whole || out
			}
		}
		switch {
		case !hit:
			// Nothing removed: share the registry's slice and string, so
			// a state that does not touch a table costs it nothing.
			s.columns[i], s.selects[i] = reg.columns[i], reg.selects[i]
		case t.whole:
			s.columns[i], s.gone[i] = []string{}, true
		default:
			kept := make([]string, 0, len(reg.columns[i]))
			for _, c := range reg.columns[i] {
				if _, out := t.columns[c]; !out {
					kept = append(kept, c)
				}
			}
			if len(kept) == len(reg.columns[i]) {
				s.columns[i], s.selects[i] = reg.columns[i], reg.selects[i]
			} else {
				s.columns[i], s.selects[i] = kept, selectList(kept)
			}
		}
	}
	return s
}

// Epoch returns the epoch of the state this snapshot holds.
func (s *Snapshot) Epoch() int64 { return s.epoch }

// Removed reports whether the service must not name column of table: true
// iff some release in contract, contracting or complete removes that column
// or the whole table. Removed(table, "") reports whether the whole table is
// removed. table is spelled as in the manifests ("instances" or
// "nova.instances"); "instances" does not match a removal of
// "nova.instances". It does not allocate.
func (s *Snapshot) Removed(table, column string) bool {
	t, ok := s.removed[table]
	if !ok {
		return false
	}
	if t.whole {
		return true
	}
	_, ok = t.columns[column]
	return ok
}

// ColumnRemoved is Removed for a column resolved with Agent.Column: a
// slice index, for the hot path. It panics on the zero ColumnRef.
func (s *Snapshot) ColumnRemoved(c ColumnRef) bool {
	if c.i == 0 {
		panic("agent: zero ColumnRef: resolve columns with Agent.Column")
	}
	return s.colGone[c.i-1]
}

// Columns returns the registered table's columns minus the removed ones, in
// the order Config.Tables gave them; empty when the whole table is removed.
// The slice is shared: callers must not modify it. It does not allocate.
// It panics on the zero TableRef.
func (s *Snapshot) Columns(t TableRef) []string {
	return s.columns[t.index()]
}

// SelectList returns Columns(t) quoted and joined for a SELECT:
// `"id", "Display Name"`. It is "" when the whole table is removed. It does
// not allocate. It panics on the zero TableRef.
func (s *Snapshot) SelectList(t TableRef) string {
	return s.selects[t.index()]
}

// TableRemoved reports whether the registered table itself is removed.
func (s *Snapshot) TableRemoved(t TableRef) bool {
	return s.gone[t.index()]
}

// Phase returns the phase of release, and false if this state does not
// hold the release.
func (s *Snapshot) Phase(release string) (phase.Phase, bool) {
	p, ok := s.phases[release]
	return p, ok
}

func (t TableRef) index() int {
	if t.i == 0 {
		panic("agent: zero TableRef: resolve tables with Agent.Table")
	}
	return int(t.i - 1)
}
