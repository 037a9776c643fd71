package agent

import (
	"context"
	"database/sql"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/config"
	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/internal/wire"
	"github.com/phasecast/phasecast/schema"
)

// TestAgentBehindTransactionPoolerBinaryParameters: an agent whose
// database handle goes through PgBouncer in transaction mode, with lib/pq's
// binary_parameters=yes as lib/pq needs there, starts, follows flips
// through the store, and records a goodbye: every store path an agent runs
// works, and none fails.
func TestAgentBehindTransactionPoolerBinaryParameters(t *testing.T) {
	t.Parallel()
	b := setup(t, fakeOptions{noBeacons: true})
	applyRelease(t, b.store, manifestL)
	epoch := flip(t, b.store, "L", phase.Migrate)

	pooled := testenv.PgBouncer(t, testenv.PoolTransaction)
	dsn, err := config.WithApplicationName(testenv.WithParam(pooled, "binary_parameters", "yes"), "phasecast:pooled-agent")
	require.NoError(t, err)
	db, err := sql.Open("postgres", dsn)
	require.NoError(t, err)
	t.Cleanup(func() { db.Close() })
	db.SetMaxOpenConns(3)

	cfg := b.config(t, false)
	cfg.DB = db
	a := startAgent(t, cfg) // SyncAgent: the lease and the state in one transaction
	require.Equal(t, epoch, a.Snapshot().Epoch(), "the state came from the store through the pooler")

	// Flips reach the agent as state messages it confirms against the
	// store (StateDigest, State) through the pooler.
	for _, to := range []phase.Phase{phase.Contract, phase.Migrate, phase.Contract} {
		var e int64
		if to == phase.Migrate {
			res, err := b.store.Rollback(context.Background(), "L", schema.FlipOptions{Actor: "test"})
			require.NoError(t, err)
			e = res.Epoch
		} else {
			e = flip(t, b.store, "L", to)
		}
		b.fake.publishNow()
		waitEpoch(t, a, e)
	}

	// The goodbye an agent records in the store when the broker is gone.
	pooledStore, err := schema.NewStore(sqlx.NewDb(db, "postgres"), b.store.Schema())
	require.NoError(t, err)
	st := a.Stats()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	bye := testenv.Credentials(wire.Status{V: wire.StatusVersion, Kind: wire.KindStatus,
		AgentID: "goodbye-" + a.ID(), Service: "nova-api", Seq: 1, Releases: []string{"L"}, Leaving: true})
	_, err = pooledStore.SyncAgent(ctx, bye, 0) // agent_sync: the token as bytea, the status as text
	require.NoError(t, err)
	_, recorded, err := pooledStore.RecordStatuses(ctx, []wire.Status{func() wire.Status { s := bye; s.Seq++; return s }()}, 0)
	require.NoError(t, err)
	require.Len(t, recorded, 1)

	require.Zero(t, st.ResyncFailures, "no store read of the agent failed")
	require.Positive(t, st.Resyncs+st.DigestConfirms)
}
