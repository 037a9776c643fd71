package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/internal/wire"
	"github.com/phasecast/phasecast/schema"
)

// recordAgent records one agent status as the broadcaster does.
func recordAgent(ctx context.Context, store *schema.Store, id string, drained int64, releases ...string) error {
	st := testenv.Credentials(wire.Status{V: wire.StatusVersion, Kind: wire.KindStatus, AgentID: id, Service: "svc-" + id, Host: "host-" + id,
		PID: 4343, Version: "v0.9", Releases: releases, Seq: 1, AppliedEpoch: drained, DrainedEpoch: drained, SentAt: time.Now()})
	_, _, err := store.RecordStatuses(ctx, []wire.Status{st}, time.Minute)
	return err
}

// readyToContract takes release L to contract with a leading broadcaster
// and a live agent that acknowledged the contract epoch, so that a runner
// goes straight on to the DDL.
func (b *cliBundle) readyToContract(t *testing.T, manifest string) {
	t.Helper()
	ctx := context.Background()
	for _, args := range [][]string{{"release", "apply", manifest}, {"flip", "L", "migrate"}, {"flip", "L", "contract"}} {
		code, _, errOut := b.run(t, args...)
		require.Zero(t, code, errOut)
	}
	rel, err := b.store.Release(ctx, "L")
	require.NoError(t, err)
	require.NoError(t, b.store.TouchBroadcaster(ctx, schema.Broadcaster{ID: "b1", Host: "h", PID: 1, Leader: true}))
	require.NoError(t, recordAgent(ctx, b.store, "new", rel.ContractEpoch.Int64, "L"))
}

// holdInstances opens a long transaction that holds a lock the DROP of a
// column of instances conflicts with; unlock ends it.
func (b *cliBundle) holdInstances(t *testing.T) (unlock func()) {
	t.Helper()
	ctx := context.Background()
	blocker, err := b.store.DB().Conn(ctx)
	require.NoError(t, err)
	t.Cleanup(func() { _ = blocker.Close() })
	_, err = blocker.ExecContext(ctx, `BEGIN`)
	require.NoError(t, err)
	_, err = blocker.ExecContext(ctx, fmt.Sprintf(`LOCK TABLE %q.instances IN ACCESS SHARE MODE`, b.store.Schema()))
	require.NoError(t, err)
	return func() {
		_, err := blocker.ExecContext(ctx, `ROLLBACK`)
		require.NoError(t, err)
	}
}

// TestContractDDLTimeoutThroughTheCLI: the DDL deadline has its own exit
// code, and old code that registers while the DDL retries is named.
func TestContractDDLTimeoutThroughTheCLI(t *testing.T) {
	b, manifest := setupCLI(t)
	ctx := context.Background()
	b.readyToContract(t, manifest)

	// A long transaction holds a lock the DROP conflicts with.
	unlock := b.holdInstances(t)

	// Once the runner is in contracting, old code registers.
	registered := make(chan error, 1)
	go func() {
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
			if r, err := b.store.Release(ctx, "L"); err == nil && r.Phase == phase.Contracting {
				registered <- recordAgent(ctx, b.store, "old", 0, "K")
				return
			}
		}
		registered <- fmt.Errorf("the release never reached contracting")
	}()

	code, out, errOut := b.run(t, "contract", "L", "--json", "--lock-timeout", "100ms", "--ddl-timeout", "1500ms")
	require.NoError(t, <-registered)
	require.Equal(t, ExitDDLTimeout, code, errOut)
	var doc struct {
		schema.ContractResult
		Error    string `json:"error"`
		ExitCode int    `json:"exit_code"`
	}
	require.NoError(t, json.Unmarshal([]byte(out), &doc))
	require.Equal(t, ExitDDLTimeout, doc.ExitCode)
	require.Equal(t, schema.OutcomeDDLTimeout, doc.Outcome)
	require.Contains(t, doc.Error, "--ddl-timeout")
	require.Len(t, doc.OldCodeDuringDDL, 1)
	require.Equal(t, "svc-old", doc.OldCodeDuringDDL[0].Service)
	require.Contains(t, errOut, "agent old (service svc-old on host host-old, pid 4343) runs code that predates L and appeared during the DDL")
	require.Contains(t, errOut, "phasecast: ")

	// Left in contracting with the column in place; once the lock is
	// gone, the same command finishes.
	r, err := b.store.Release(ctx, "L")
	require.NoError(t, err)
	require.Equal(t, phase.Contracting, r.Phase)
	var n int
	require.NoError(t, b.store.DB().Get(&n, `SELECT count(*) FROM information_schema.columns WHERE table_schema = $1 AND table_name = 'instances' AND column_name = 'name'`, b.store.Schema()))
	require.Equal(t, 1, n)
	unlock()
	code, out, errOut = b.run(t, "contract", "L")
	require.Zero(t, code, errOut)
	require.Contains(t, out, "release L: complete")
	require.Contains(t, out, "appeared during the DDL, running code that predates L: old (svc-old on host-old/4343")
}

// TestFlipSaysRemovalAlreadyGone: the flip-time checks report a removed
// column that no longer exists instead of passing over it.
func TestFlipSaysRemovalAlreadyGone(t *testing.T) {
	b, manifest := setupCLI(t)
	for _, args := range [][]string{{"release", "apply", manifest}, {"flip", "L", "migrate"}} {
		code, _, errOut := b.run(t, args...)
		require.Zero(t, code, errOut)
	}
	_, err := b.store.DB().Exec(fmt.Sprintf(`ALTER TABLE %q.instances DROP COLUMN name`, b.store.Schema()))
	require.NoError(t, err)
	code, _, errOut := b.run(t, "flip", "L", "contract")
	require.Zero(t, code, errOut)
	require.Contains(t, errOut, fmt.Sprintf(`note: column "%s"."instances"."name" of removal %s.instances is already gone: that part counts as done`,
		b.store.Schema(), b.store.Schema()))
}

// TestFlipListsWhatCascadeDrops: flipping to contract names on stderr each
// object a removal with cascade: true will drop, and only those; --json
// output stays one JSON document.
func TestFlipListsWhatCascadeDrops(t *testing.T) {
	b, _ := setupCLI(t)
	app := b.store.Schema()
	_, err := b.store.DB().Exec(fmt.Sprintf(`CREATE VIEW %[1]q.v_names AS SELECT id, name FROM %[1]q.instances;
		CREATE VIEW %[1]q.v_common AS SELECT id, common_name FROM %[1]q.instances`, app))
	require.NoError(t, err)
	manifest := b.write(t, "C.yaml", fmt.Sprintf(`release: C
removed:
  - table: %s.instances
    columns: [name]
    cascade: true
`, app))
	for _, args := range [][]string{{"release", "apply", manifest}, {"flip", "C", "migrate"}} {
		code, _, errOut := b.run(t, args...)
		require.Zero(t, code, errOut)
	}
	code, out, errOut := b.run(t, "flip", "C", "contract", "--json")
	require.Zero(t, code, errOut)
	var res schema.FlipResult
	require.NoError(t, json.Unmarshal([]byte(out), &res), "stdout is the JSON alone: %q", out)
	require.Equal(t, phase.Contract, res.To)
	require.Equal(t, fmt.Sprintf("note: view \"%s\".\"v_names\" depends on removal %s.instances, which says cascade: true: the contract drops it too\n", app, app), errOut)
	require.NotContains(t, errOut, "v_common")
}
