package schema_test

import (
	"errors"
	"testing"
	"time"

	"github.com/lib/pq"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/schema"
)

// TestContractResumesOnlyWhatARunnerTookToContracting: a runner that
// stopped after entering contracting is resumed at the DDL; a release in
// contracting that no runner took there is not dropped on trust.
func TestContractResumesOnlyWhatARunnerTookToContracting(t *testing.T) {
	t.Run("CrashBeforeDDLResumes", func(t *testing.T) {
		t.Parallel()
		b, epoch := setupAcked(t, "a")
		crash := errors.New("simulated crash")
		res, err := b.store.Contract(b.ctx, "L", fast(schema.ContractOptions{Actor: "first", BeforeDDL: func() error { return crash }}))
		require.ErrorIs(t, err, crash)
		require.Equal(t, schema.OutcomeFailed, res.Outcome)
		require.Equal(t, phase.Contracting, b.phase("L"))
		rel, err := b.store.Release(b.ctx, "L")
		require.NoError(t, err)
		require.True(t, rel.ContractingBy.Valid)
		require.Contains(t, rel.ContractingBy.String, "first (pid ")
		require.Contains(t, b.columns(), "instances.name", "stopped before the DDL")

		// An agent that shows up unacknowledged now does not hold up the
		// resumed run: contracting was entered with every agent acked.
		b.agent(agentSpec{id: "late", drained: epoch - 1, releases: []string{"L"}})
		res, err = b.store.Contract(b.ctx, "L", fast(schema.ContractOptions{Timeout: 200 * time.Millisecond}))
		require.NoError(t, err)
		require.Equal(t, schema.OutcomeComplete, res.Outcome)
		require.Len(t, res.Dropped, 2)
		require.Equal(t, []string{"instances.id", "instances.common_name"}, b.columns())
	})

	t.Run("UnverifiedIsRefusedAndRechecked", func(t *testing.T) {
		t.Parallel()
		b, epoch := setupAcked(t, "a")
		b.agent(agentSpec{id: "behind", drained: epoch - 1, releases: []string{"L"}})
		// What an older binary's 'flip L contracting' leaves: no runner's mark.
		b.exec(`UPDATE ` + pq.QuoteIdentifier(b.store.Schema()) + `.releases SET phase = 'contracting' WHERE name = 'L'`)
		before := b.columns()

		for _, dryRun := range []bool{true, false} {
			res, err := b.store.Contract(b.ctx, "L", fast(schema.ContractOptions{DryRun: dryRun}))
			require.ErrorIs(t, err, schema.ErrContractingUnverified)
			require.ErrorContains(t, err, "--recheck")
			require.Equal(t, schema.OutcomeRefused, res.Outcome)
		}
		res, err := b.store.Contract(b.ctx, "L", fast(schema.ContractOptions{Recheck: true, Timeout: 300 * time.Millisecond}))
		var te *schema.AckTimeoutError
		require.ErrorAs(t, err, &te)
		require.Equal(t, schema.OutcomeTimeout, res.Outcome)
		require.Len(t, te.Missing, 1)
		require.Equal(t, "behind", te.Missing[0].ID)
		require.Equal(t, before, b.columns(), "nothing dropped while an agent has not acknowledged")
		require.Equal(t, phase.Contracting, b.phase("L"))

		b.agent(agentSpec{id: "behind", drained: epoch, releases: []string{"L"}})
		res, err = b.store.Contract(b.ctx, "L", fast(schema.ContractOptions{Recheck: true, Actor: "rechecker"}))
		require.NoError(t, err)
		require.Equal(t, schema.OutcomeComplete, res.Outcome)
		require.Len(t, res.Acked, 2)
		require.Equal(t, []string{"instances.id", "instances.common_name"}, b.columns())
		rel, err := b.store.Release(b.ctx, "L")
		require.NoError(t, err)
		require.Contains(t, rel.ContractingBy.String, "rechecker (pid ")
	})
}
