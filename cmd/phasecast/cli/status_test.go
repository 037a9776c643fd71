package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/schema"
)

// TestStatusShowsStoreAndContractingRunner: status, as text and as JSON,
// names the store's identity, and for a release left in contracting the
// runner that holds it, which is what an operator needs to find the run
// (or to know it stopped) before running contract again.
func TestStatusShowsStoreAndContractingRunner(t *testing.T) {
	b, manifest := setupCLI(t)
	ctx := context.Background()
	b.readyToContract(t, manifest)
	storeID, err := b.store.ID(ctx)
	require.NoError(t, err)
	require.NotEmpty(t, storeID)

	status := func() (string, *schema.Report) {
		t.Helper()
		code, text, errOut := b.run(t, "status")
		require.Zero(t, code, errOut)
		code, out, errOut := b.run(t, "status", "--json")
		require.Zero(t, code, errOut)
		var rep schema.Report
		require.NoError(t, json.Unmarshal([]byte(out), &rep))
		require.Len(t, rep.Releases, 1)
		return text, &rep
	}

	// In contract, nobody holds it yet.
	text, rep := status()
	require.Contains(t, text, fmt.Sprintf("schema %s, store %s, epoch ", b.store.Schema(), storeID))
	require.Equal(t, storeID, rep.StoreID)
	require.NotContains(t, text, "CONTRACTING")
	require.Empty(t, rep.Releases[0].HeldBy)

	// A runner takes it to contracting and stops there: its DDL cannot
	// take its lock before --ddl-timeout.
	unlock := b.holdInstances(t)
	code, _, errOut := b.run(t, "contract", "L", "--actor", "night-runner", "--lock-timeout", "50ms", "--ddl-timeout", "300ms")
	require.Equal(t, ExitDDLTimeout, code, errOut)

	runner := fmt.Sprintf("night-runner (pid %d on ", os.Getpid())
	text, rep = status()
	require.Contains(t, text, fmt.Sprintf("schema %s, store %s, epoch ", b.store.Schema(), storeID))
	require.Regexp(t, `L\s+contracting\s+`, text)
	require.Regexp(t, regexp.QuoteMeta("CONTRACTING L: held by "+runner)+`[^)]+\); should that run have stopped, 'phasecast contract L' resumes at the DDL`, text)
	require.Equal(t, storeID, rep.StoreID)
	require.Equal(t, phase.Contracting, rep.Releases[0].Phase)
	require.Contains(t, rep.Releases[0].HeldBy, runner)
	require.Equal(t, "L", rep.Releases[0].Name)
	stored, err := b.store.Release(ctx, "L")
	require.NoError(t, err)
	require.Equal(t, stored.ContractingBy.String, rep.Releases[0].HeldBy, "the identity the runner recorded")

	// Once complete, nobody holds it.
	unlock()
	code, _, errOut = b.run(t, "contract", "L")
	require.Zero(t, code, errOut)
	text, rep = status()
	require.Regexp(t, `L\s+complete\s+`, text)
	require.NotContains(t, text, "CONTRACTING")
	require.Empty(t, rep.Releases[0].HeldBy)
}
