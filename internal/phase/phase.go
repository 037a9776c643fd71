package phase

import (
	"fmt"
	"slices"
)

// Phase is where a release stands in expand → migrate → contract.
type Phase string

const (
	Expand      Phase = "expand"
	Migrate     Phase = "migrate"
	Contract    Phase = "contract"
	Contracting Phase = "contracting"
	Complete    Phase = "complete"
)

// All lists the phases in order.
var All = []Phase{Expand, Migrate, Contract, Contracting, Complete}

// next holds every allowed move. contract→migrate is the one rollback, and it
// is allowed only until a runner has taken the release to contracting.
var next = map[Phase][]Phase{
	Expand:      {Migrate},
	Migrate:     {Contract},
	Contract:    {Contracting, Migrate},
	Contracting: {Complete},
	Complete:    nil,
}

// Parse returns the phase named s, or an error listing the valid names.
func Parse(s string) (Phase, error) {
	p := Phase(s)
	if !p.Valid() {
		return "", fmt.Errorf("unknown phase %q (phases: %v)", s, All)
	}
	return p, nil
}

// Valid reports whether p is one of the five phases.
func (p Phase) Valid() bool {
	_, ok := next[p]
	return ok
}

// Next returns the phases p may move to, in a fresh slice.
func (p Phase) Next() []Phase {
	return slices.Clone(next[p])
}

// CanMove reports whether the move from → to is allowed.
func CanMove(from, to Phase) bool {
	return slices.Contains(next[from], to)
}

// RunnerOnly reports whether only the contract runner may move a release
// to p: it enters contracting after its checks and the wait for every live
// agent's acknowledgement, and complete after the DDL. An operator's flip
// to either would skip those steps.
func (p Phase) RunnerOnly() bool {
	return p == Contracting || p == Complete
}

// HidesRemoved reports whether services must stop naming the release's
// removed columns: from the contract flip on, for good.
func (p Phase) HidesRemoved() bool {
	return p == Contract || p == Contracting || p == Complete
}
