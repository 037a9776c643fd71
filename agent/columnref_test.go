package agent

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/wire"
)

// TestColumnRemovedAgreesWithRemoved checks the resolved-column lookup
// against the string one for every registered column, over states that
// hide nothing, columns, whole tables and a mix of releases.
func TestColumnRemovedAgreesWithRemoved(t *testing.T) {
	a, err := New(Config{Insecure: true, Service: "svc", Tables: testTables()})
	require.NoError(t, err)
	states := []*wire.State{
		stateL(1, phase.Expand),
		stateL(2, phase.Contract),
		{Epoch: 3, Releases: []wire.Release{
			{Name: "L", Phase: phase.Migrate, Removals: []wire.Removal{{Table: "instances", Columns: []string{"name"}}}},
			{Name: "M", Phase: phase.Contract, Removals: []wire.Removal{{Table: "instances", Columns: []string{"display_name"}}}},
			{Name: "N", Phase: phase.Complete, Removals: []wire.Removal{{Table: "nova.instances", Columns: []string{"display name", "host"}}, {Table: "Billing.invoices"}}},
			{Name: "O", Phase: phase.Contract, Removals: []wire.Removal{{Table: "legacy_flavors", Columns: []string{"id"}}, {Table: "legacy_flavors"}}},
		}},
	}
	for _, st := range states {
		s := newSnapshot(st, a.reg, nil)
		for table, cols := range testTables() {
			for _, col := range cols {
				require.Equal(t, s.Removed(table, col), s.ColumnRemoved(a.Column(table, col)), "epoch %d: %s.%s", st.Epoch, table, col)
			}
		}
	}
	s := newSnapshot(states[2], a.reg, nil)
	require.True(t, s.ColumnRemoved(a.Column("Billing.invoices", "amount")), "the whole table is removed")
	require.True(t, s.ColumnRemoved(a.Column("nova.instances", "display name")))
	require.False(t, s.ColumnRemoved(a.Column("nova.instances", "Name")))

	require.PanicsWithValue(t, `agent: column "nope" is not registered for table "instances" in Config.Tables (registered: ["id" "name" "display_name" "common_name"])`,
		func() { a.Column("instances", "nope") })
	require.Panics(t, func() { a.Column("flavors", "id") })
	require.Panics(t, func() { s.ColumnRemoved(ColumnRef{}) })
}
