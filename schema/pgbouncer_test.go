package schema_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/schema"
)

// pooledStore opens the bundle's store through a PgBouncer of the test's
// own in mode.
func (b *contractBundle) pooledStore(mode string) *schema.Store {
	b.t.Helper()
	s, err := schema.Open(b.ctx, testenv.PgBouncer(b.t, mode), b.store.Schema())
	require.NoError(b.t, err)
	b.t.Cleanup(func() { s.Close() })
	return s
}

// TestContractRunnersThroughTransactionPooler: two runners whose store
// goes through PgBouncer in transaction mode must never both hold the
// contract lock (both used to, their pg_try_advisory_lock landing on one
// server session), and none may leave the lock behind for a direct runner.
func TestContractRunnersThroughTransactionPooler(t *testing.T) {
	t.Parallel()
	b := setupContract(t)
	b.instances()
	_, epoch := b.toContract(releaseL)
	b.leader()
	b.agent(agentSpec{id: "slow", drained: epoch - 1, releases: []string{"L"}}) // the runners wait for it
	pooled := b.pooledStore(testenv.PoolTransaction)

	holding := make(chan struct{})
	first := make(chan error, 1)
	go func() {
		signalled := false
		_, err := pooled.Contract(b.ctx, "L", fast(schema.ContractOptions{Timeout: 4 * time.Second, Progress: func(schema.Progress) {
			if !signalled {
				signalled = true
				close(holding)
			}
		}}))
		first <- err
	}()
	var err1 error
	select {
	case <-holding: // the first runner waits for acks, holding the lock
	case err1 = <-first:
	}
	_, err2 := pooled.Contract(b.ctx, "L", fast(schema.ContractOptions{Timeout: time.Second}))
	if err1 == nil {
		err1 = <-first
	}
	t.Logf("first runner: %v\nsecond runner: %v", err1, err2)
	held := func(err error) bool { return errors.Is(err, schema.ErrAckTimeout) }
	require.False(t, held(err1) && held(err2), "both runners held the contract lock: %v / %v", err1, err2)
	for _, err := range []error{err1, err2} {
		if !held(err) {
			require.True(t, errors.Is(err, schema.ErrTransactionPooler) || errors.Is(err, schema.ErrRunnerBusy), "%v", err)
		}
	}
	var perr *schema.PoolerError
	require.ErrorAs(t, errors.Join(err1, err2), &perr, "a transaction pooler is named")
	require.Contains(t, perr.Error(), "session pooling")
	require.Contains(t, perr.Error(), "docs/deploying.md")
	require.Equal(t, phase.Contract, b.phase("L"))

	// No lock was left behind on a pooled server session.
	b.agent(agentSpec{id: "slow", drained: epoch, releases: []string{"L"}})
	res, err := b.store.Contract(b.ctx, "L", fast(schema.ContractOptions{}))
	require.NoError(t, err)
	require.Equal(t, schema.OutcomeComplete, res.Outcome)
}

// TestContractThroughSessionPooler: through PgBouncer in session mode the
// runner holds its lock and completes.
func TestContractThroughSessionPooler(t *testing.T) {
	t.Parallel()
	b, _ := setupAcked(t, "a1")
	res, err := b.pooledStore(testenv.PoolSession).Contract(b.ctx, "L", fast(schema.ContractOptions{}))
	require.NoError(t, err)
	require.Equal(t, schema.OutcomeComplete, res.Outcome)
	require.Equal(t, phase.Complete, b.phase("L"))
}

// TestContractUnlockFailureIsAnError: when the lock's session is gone by
// the time the run releases it, the run says so instead of succeeding
// quietly, and its connection is closed, not pooled.
func TestContractUnlockFailureIsAnError(t *testing.T) {
	t.Parallel()
	b, _ := setupAcked(t, "a1")
	lockPID := func() int {
		var pid int
		require.NoError(t, b.db.GetContext(b.ctx, &pid, `SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted
			AND ((classid::bigint << 32) | objid::bigint) = hashtext($1)::bigint`, b.store.LockKey("contract:L")))
		return pid
	}
	res, err := b.store.Contract(b.ctx, "L", fast(schema.ContractOptions{BeforeComplete: func() error {
		pid := lockPID()
		t.Log("terminating", pid)
		_, err := b.db.ExecContext(context.Background(), `SELECT pg_terminate_backend($1)`, pid)
		return err
	}}))
	require.Error(t, err)
	require.Contains(t, err.Error(), "releasing the contract lock")
	require.NotNil(t, res)
	require.Equal(t, schema.OutcomeComplete, res.Outcome, "the DDL ran and the release is complete; only the unlock failed")
}

// TestSessionLockRefusesReentryOnSharedSession: advisory locks are
// re-entrant, so a lock another client left on a pooled server session
// would be granted again to whoever lands there. TryLockSession refuses
// instead of taking it a second time.
func TestSessionLockRefusesReentryOnSharedSession(t *testing.T) {
	t.Parallel()
	b := setupContract(t)
	pooled := b.pooledStore(testenv.PoolTransaction)
	key := pooled.LockKey("contract:L")
	// A client that took the lock and went on (its server session went
	// back to PgBouncer's pool, lock and all).
	var pid int
	require.NoError(t, pooled.DB().GetContext(b.ctx, &pid, `SELECT pg_backend_pid() FROM (SELECT pg_advisory_lock(hashtext($1))) l`, key))
	t.Cleanup(func() { _, _ = b.db.Exec(`SELECT pg_terminate_backend($1)`, pid) })

	conn, err := pooled.DB().Conn(b.ctx)
	require.NoError(t, err)
	defer conn.Close()
	lock, ok, err := pooled.TryLockSession(b.ctx, conn, "contract:L", "the contract lock")
	require.Nil(t, lock)
	require.False(t, ok)
	require.ErrorIs(t, err, schema.ErrTransactionPooler)
	require.Contains(t, err.Error(), "already held the lock")
}

// TestStoreWithBinaryParameters: with lib/pq's binary_parameters=yes, as
// behind a transaction pooler, every JSON parameter the store sends (a
// manifest, statuses, the runner's removals) goes as text: jsonb's binary
// input used to reject them ("unsupported jsonb version number").
func TestStoreWithBinaryParameters(t *testing.T) {
	t.Parallel()
	b := setupContract(t)
	b.instances()
	binary, err := schema.Open(b.ctx, testenv.WithParam(testenv.DatabaseURL(), "binary_parameters", "yes"), b.store.Schema())
	require.NoError(t, err)
	t.Cleanup(func() { binary.Close() })
	b.store = binary // the bundle's helpers now go through binary parameters

	_, epoch := b.toContract(releaseL) // ApplyRelease: the manifest
	b.leader()
	b.agent(agentSpec{id: "a1", drained: epoch, releases: []string{"L"}})   // RecordStatuses
	res, err := binary.Contract(b.ctx, "L", fast(schema.ContractOptions{})) // the session list's removals
	require.NoError(t, err)
	require.Equal(t, schema.OutcomeComplete, res.Outcome)
}
