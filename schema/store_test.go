package schema_test

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/internal/wire"
	"github.com/phasecast/phasecast/schema"
)

type storeBundle struct {
	store *schema.Store
	table string // a scratch table of the test's own, in the test's schema
}

// setupStore returns a migrated store in its own schema and a release "L"
// registered in expand, whose manifest removes a column of a scratch table.
func setupStore(t *testing.T) (*schema.Store, *storeBundle) {
	t.Helper()
	store := testenv.Store(t)
	b := &storeBundle{store: store, table: store.Schema() + ".instances"}
	_, err := store.DB().Exec(`CREATE TABLE "` + store.Schema() + `".instances (id serial PRIMARY KEY, name text, common_name text)`)
	require.NoError(t, err)
	return store, b
}

func (b *storeBundle) manifest(t *testing.T, release string) *schema.Manifest {
	t.Helper()
	m, err := schema.ParseManifest("test.yaml", []byte(fmt.Sprintf(`
release: %s
expand:
  - SELECT 1
preconditions:
  - name: every instance has a common_name
    sql: SELECT 1 FROM %s WHERE common_name IS NULL LIMIT 1
removed:
  - table: %s
    columns: [name]
`, release, b.table, b.table)))
	require.NoError(t, err)
	return m
}

// snapshotTables captures every row phasecast keeps, to prove a refused
// operation changed nothing.
func snapshotTables(t *testing.T, store *schema.Store) map[string][]string {
	t.Helper()
	out := map[string][]string{}
	for _, table := range []string{"epoch", "releases", "removals", "events", "audit"} {
		var rows []string
		err := store.DB().Select(&rows, fmt.Sprintf(`SELECT t::text FROM %q.%q t ORDER BY 1`, store.Schema(), table))
		require.NoError(t, err)
		out[table] = rows
	}
	return out
}

func TestMigrateIsIdempotentAndConcurrent(t *testing.T) {
	db := testenv.DB(t)
	name := testenv.Name("pct")
	t.Cleanup(func() { testenv.DropSchema(t, db, name) })
	store, err := schema.NewStore(db, name)
	require.NoError(t, err)

	var wg sync.WaitGroup
	results := make([]schema.MigrationResult, 5)
	errs := make([]error, 5)
	for i := range results {
		wg.Go(func() { results[i], errs[i] = store.Migrate(context.Background()) })
	}
	wg.Wait()
	var versions []int
	require.NoError(t, db.Select(&versions, `SELECT version FROM "`+name+`".schema_migrations ORDER BY version`))
	var applied [][]int
	for i := range results {
		require.NoError(t, errs[i])
		if len(results[i].Applied) > 0 {
			applied = append(applied, results[i].Applied)
		}
		require.Equal(t, versions[len(versions)-1], results[i].Current)
	}
	require.Equal(t, [][]int{versions}, applied, "exactly one concurrent run applies the migrations")

	again, err := store.Migrate(context.Background())
	require.NoError(t, err)
	require.Empty(t, again.Applied)
}

func TestNotMigratedSaysWhatToDo(t *testing.T) {
	store, err := schema.NewStore(testenv.DB(t), testenv.Name("pct_missing"))
	require.NoError(t, err)
	_, err = store.Report(context.Background(), 5)
	require.ErrorIs(t, err, schema.ErrNotMigrated)
	require.ErrorContains(t, err, "phasecast migrate")
}

func TestApplyRelease(t *testing.T) {
	ctx := context.Background()

	t.Run("registers in expand and is idempotent", func(t *testing.T) {
		store, b := setupStore(t)
		m := b.manifest(t, "L")
		res, err := store.ApplyRelease(ctx, m, "tester")
		require.NoError(t, err)
		require.Equal(t, phase.Expand, res.Phase)
		require.EqualValues(t, 1, res.Epoch)
		before := snapshotTables(t, store)

		again, err := store.ApplyRelease(ctx, b.manifest(t, "L"), "tester")
		require.NoError(t, err)
		require.True(t, again.Unchanged)
		require.Equal(t, before, snapshotTables(t, store), "re-applying an identical manifest changes nothing")
	})

	t.Run("a changed manifest replaces one in expand", func(t *testing.T) {
		store, b := setupStore(t)
		_, err := store.ApplyRelease(ctx, b.manifest(t, "L"), "tester")
		require.NoError(t, err)
		changed := b.manifest(t, "L")
		changed.Removed[0].Columns = []string{"name", "common_name"}
		res, err := store.ApplyRelease(ctx, changed, "tester")
		require.NoError(t, err)
		require.True(t, res.Updated)
		st, err := store.State(ctx)
		require.NoError(t, err)
		require.Equal(t, []string{"name", "common_name"}, st.Releases[0].Removals[0].Columns)
	})

	t.Run("a changed manifest past expand is refused", func(t *testing.T) {
		store, b := setupStore(t)
		_, err := store.ApplyRelease(ctx, b.manifest(t, "L"), "tester")
		require.NoError(t, err)
		_, err = store.Flip(ctx, "L", phase.Migrate, schema.FlipOptions{})
		require.NoError(t, err)
		before := snapshotTables(t, store)
		changed := b.manifest(t, "L")
		changed.Description = "something else"
		_, err = store.ApplyRelease(ctx, changed, "tester")
		require.ErrorIs(t, err, schema.ErrManifestChanged)
		require.Equal(t, before, snapshotTables(t, store))
	})

	t.Run("failing expand SQL leaves nothing behind", func(t *testing.T) {
		store, b := setupStore(t)
		m := b.manifest(t, "L")
		m.Expand = []string{`ALTER TABLE ` + b.table + ` ADD COLUMN half_written text`, `SELECT no_such_function()`}
		before := snapshotTables(t, store)
		_, err := store.ApplyRelease(ctx, m, "tester")
		require.ErrorContains(t, err, "expand[1]")
		require.Equal(t, before, snapshotTables(t, store))
		var n int
		require.NoError(t, store.DB().Get(&n, `SELECT count(*) FROM information_schema.columns WHERE table_schema = $1 AND column_name = 'half_written'`, store.Schema()))
		require.Zero(t, n, "the expand statement before the failure was rolled back too")
	})

	t.Run("expand naming a missing table blames the manifest, not the store", func(t *testing.T) {
		store, b := setupStore(t)
		m := b.manifest(t, "L")
		m.Expand = []string{`ALTER TABLE no_such_table ADD COLUMN c text`}
		_, err := store.ApplyRelease(ctx, m, "tester")
		var expand *schema.ExpandError
		require.ErrorAs(t, err, &expand)
		require.Equal(t, 0, expand.Index)
		require.NotErrorIs(t, err, schema.ErrNotMigrated)
		require.ErrorContains(t, err, `expand[0] failed, nothing was applied`)
		require.ErrorContains(t, err, `"no_such_table" does not exist`)
	})
}

// moveTo walks release L from expand to target along the allowed path:
// flips up to contract, and the contract runner from there (stopped before
// the DDL for contracting).
func moveTo(t *testing.T, store *schema.Store, target phase.Phase) {
	t.Helper()
	ctx := context.Background()
	for _, p := range []phase.Phase{phase.Migrate, phase.Contract} {
		if target == phase.Expand || target == phase.Migrate && p == phase.Contract {
			return
		}
		_, err := store.Flip(ctx, "L", p, schema.FlipOptions{Actor: "tester"})
		require.NoError(t, err)
	}
	if target == phase.Contract {
		return
	}
	require.NoError(t, store.TouchBroadcaster(ctx, schema.Broadcaster{ID: "b", Host: "h", PID: 1, Leader: true}))
	opts := schema.ContractOptions{Actor: "tester"}
	stop := errors.New("stopped before the DDL")
	if target == phase.Contracting {
		opts.BeforeDDL = func() error { return stop }
	}
	_, err := store.Contract(ctx, "L", opts)
	if target == phase.Contracting {
		require.ErrorIs(t, err, stop)
	} else {
		require.NoError(t, err)
	}
	rel, err := store.Release(ctx, "L")
	require.NoError(t, err)
	require.Equal(t, target, rel.Phase)
}

func TestEveryTransition(t *testing.T) {
	ctx := context.Background()
	for _, from := range phase.All {
		for _, to := range phase.All {
			t.Run(fmt.Sprintf("%s to %s", from, to), func(t *testing.T) {
				t.Parallel()
				store, b := setupStore(t)
				_, err := store.ApplyRelease(ctx, b.manifest(t, "L"), "tester")
				require.NoError(t, err)
				moveTo(t, store, from)
				before := snapshotTables(t, store)
				epoch, err := store.Epoch(ctx)
				require.NoError(t, err)

				res, err := store.Flip(ctx, "L", to, schema.FlipOptions{Actor: "tester"})
				// Only the contract runner enters its phases.
				if to.RunnerOnly() || !phase.CanMove(from, to) {
					var te *schema.TransitionError
					require.ErrorAs(t, err, &te)
					require.ErrorIs(t, err, schema.ErrRefused)
					want := "allowed from " + string(from)
					if to.RunnerOnly() {
						want = "run 'phasecast contract L'"
					}
					require.Contains(t, err.Error(), want)
					require.Equal(t, before, snapshotTables(t, store), "a refused flip changes nothing")
					return
				}
				require.NoError(t, err)
				require.Equal(t, from, res.From)
				require.Equal(t, epoch+1, res.Epoch)
				rel, err := store.Release(ctx, "L")
				require.NoError(t, err)
				require.Equal(t, to, rel.Phase)

				var audit struct {
					From  string `db:"from_phase"`
					To    string `db:"to_phase"`
					Epoch int64  `db:"epoch"`
					Actor string `db:"actor"`
				}
				require.NoError(t, store.DB().Get(&audit, fmt.Sprintf(`SELECT from_phase, to_phase, epoch, actor FROM %q.audit ORDER BY id DESC LIMIT 1`, store.Schema())))
				require.Equal(t, string(from), audit.From)
				require.Equal(t, string(to), audit.To)
				require.Equal(t, res.Epoch, audit.Epoch)
				require.Equal(t, "tester", audit.Actor)
				unpublished, err := store.UnpublishedEpoch(ctx)
				require.NoError(t, err)
				require.Equal(t, res.Epoch, unpublished, "the outbox holds the flip")
			})
		}
	}
}

func TestRollback(t *testing.T) {
	ctx := context.Background()
	for _, from := range phase.All {
		t.Run(string(from), func(t *testing.T) {
			t.Parallel()
			store, b := setupStore(t)
			_, err := store.ApplyRelease(ctx, b.manifest(t, "L"), "tester")
			require.NoError(t, err)
			moveTo(t, store, from)
			_, err = store.Rollback(ctx, "L", schema.FlipOptions{Actor: "tester"})
			if from == phase.Contract {
				require.NoError(t, err)
				rel, err := store.Release(ctx, "L")
				require.NoError(t, err)
				require.Equal(t, phase.Migrate, rel.Phase)
				return
			}
			require.ErrorIs(t, err, schema.ErrRefused)
			require.ErrorContains(t, err, "rollback goes from contract to migrate only")
		})
	}
}

func TestUnknownRelease(t *testing.T) {
	store, _ := setupStore(t)
	_, err := store.Flip(context.Background(), "nope", phase.Migrate, schema.FlipOptions{})
	require.ErrorIs(t, err, schema.ErrUnknownRelease)
	require.ErrorContains(t, err, `unknown release "nope"`)
}

func TestPreconditionRefusesContract(t *testing.T) {
	ctx := context.Background()
	store, b := setupStore(t)
	_, err := store.ApplyRelease(ctx, b.manifest(t, "L"), "tester")
	require.NoError(t, err)
	moveTo(t, store, phase.Migrate)
	_, err = store.DB().Exec(`INSERT INTO ` + b.table + ` (name) VALUES ('no common name yet')`)
	require.NoError(t, err)
	before := snapshotTables(t, store)

	_, err = store.Flip(ctx, "L", phase.Contract, schema.FlipOptions{})
	var pe *schema.PreconditionError
	require.ErrorAs(t, err, &pe)
	require.Equal(t, "every instance has a common_name", pe.Name)
	require.Equal(t, before, snapshotTables(t, store))

	_, err = store.DB().Exec(`UPDATE ` + b.table + ` SET common_name = name`)
	require.NoError(t, err)
	_, err = store.Flip(ctx, "L", phase.Contract, schema.FlipOptions{})
	require.NoError(t, err)
}

func TestPreconditionThatFailsToRunIsNamed(t *testing.T) {
	ctx := context.Background()
	store, b := setupStore(t)
	m := b.manifest(t, "L")
	m.Preconditions[0].SQL = `SELECT 1 FROM no_such_table`
	_, err := store.ApplyRelease(ctx, m, "tester")
	require.NoError(t, err)
	moveTo(t, store, phase.Migrate)
	_, err = store.Flip(ctx, "L", phase.Contract, schema.FlipOptions{})
	require.ErrorIs(t, err, schema.ErrPrecondition)
	require.ErrorContains(t, err, "failed to run")
}

// TestConcurrentFlips races 20 flips of one release from separate
// connections: exactly the valid ones succeed, epochs strictly increase
// without duplicates, and the outbox holds one row per accepted flip.
func TestConcurrentFlips(t *testing.T) {
	ctx := context.Background()
	store, b := setupStore(t)
	_, err := store.ApplyRelease(ctx, b.manifest(t, "L"), "tester")
	require.NoError(t, err)
	startEpoch, err := store.Epoch(ctx)
	require.NoError(t, err)

	// Ten flips to migrate and ten to contract, each on its own store and
	// connection pool: from expand, one migrate wins, then one contract.
	const n = 20
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		accepted []schema.FlipResult
		start    = make(chan struct{})
	)
	for i := range n {
		to := phase.Migrate
		if i%2 == 1 {
			to = phase.Contract
		}
		db, err := sqlx.Open("postgres", testenv.DatabaseURL())
		require.NoError(t, err)
		t.Cleanup(func() { db.Close() })
		s, err := schema.NewStore(db, store.Schema())
		require.NoError(t, err)
		wg.Go(func() {
			<-start
			res, err := s.Flip(ctx, "L", to, schema.FlipOptions{Actor: fmt.Sprint("racer-", i)})
			if err != nil {
				if !errors.Is(err, schema.ErrRefused) {
					t.Errorf("racer %d: unexpected error: %v", i, err)
				}
				return
			}
			mu.Lock()
			accepted = append(accepted, res)
			mu.Unlock()
		})
	}
	close(start)
	wg.Wait()

	// Migrate and the rollback contract → migrate are both legal, so the
	// racers may alternate; what must hold is that the accepted flips, in
	// epoch order, form a chain of allowed moves from expand.
	require.NotEmpty(t, accepted)
	sort.Slice(accepted, func(i, j int) bool { return accepted[i].Epoch < accepted[j].Epoch })
	current := phase.Expand
	for i, r := range accepted {
		require.Equal(t, startEpoch+int64(i)+1, r.Epoch, "epochs strictly increase without gaps or duplicates")
		require.Equal(t, current, r.From, "flip %d starts where the previous one ended", i)
		require.True(t, phase.CanMove(r.From, r.To), "%s → %s", r.From, r.To)
		current = r.To
	}

	var outbox []int64
	require.NoError(t, store.DB().Select(&outbox, fmt.Sprintf(`SELECT epoch FROM %q.events WHERE epoch > $1 ORDER BY epoch`, store.Schema()), startEpoch))
	require.Len(t, outbox, len(accepted), "one outbox row per accepted flip")
	rel, err := store.Release(ctx, "L")
	require.NoError(t, err)
	require.Equal(t, current, rel.Phase)
}

func TestStateAndRegistry(t *testing.T) {
	ctx := context.Background()
	store, b := setupStore(t)
	_, err := store.ApplyRelease(ctx, b.manifest(t, "L"), "tester")
	require.NoError(t, err)
	moveTo(t, store, phase.Contract)

	st, err := store.State(ctx)
	require.NoError(t, err)
	require.EqualValues(t, 3, st.Epoch)
	require.Len(t, st.Releases, 1)
	require.Equal(t, phase.Contract, st.Releases[0].Phase)
	require.Equal(t, b.table, st.Releases[0].Removals[0].Table)
	require.Equal(t, []string{"name"}, st.Releases[0].Removals[0].Columns)
}

// requireSealed checks the stored digest is the digest of the state.
func requireSealed(t *testing.T, store *schema.Store) {
	t.Helper()
	ctx := context.Background()
	st, err := store.State(ctx)
	require.NoError(t, err)
	digest, err := store.StateDigest(ctx)
	require.NoError(t, err)
	require.Equal(t, st.Digest(), digest, "the stored digest is the state's, at epoch %d", st.Epoch)
}

func TestStateDigest(t *testing.T) {
	ctx := context.Background()

	t.Run("every change writes the digest of the state it leaves", func(t *testing.T) {
		store, b := setupStore(t)
		requireSealed(t, store) // written by Migrate, for the empty state
		_, err := store.ApplyRelease(ctx, b.manifest(t, "L"), "tester")
		require.NoError(t, err)
		requireSealed(t, store)
		for _, p := range []phase.Phase{phase.Migrate, phase.Contract} {
			_, err := store.Flip(ctx, "L", p, schema.FlipOptions{})
			require.NoError(t, err)
			requireSealed(t, store)
		}
		_, err = store.Rollback(ctx, "L", schema.FlipOptions{})
		require.NoError(t, err)
		requireSealed(t, store)
	})

	t.Run("a change that writes no digest leaves one that matches no state", func(t *testing.T) {
		store, b := setupStore(t)
		_, err := store.ApplyRelease(ctx, b.manifest(t, "L"), "tester")
		require.NoError(t, err)
		// What a binary from before the digest does to the epoch row.
		_, err = store.DB().Exec(`UPDATE "` + store.Schema() + `".epoch SET value = value + 1`)
		require.NoError(t, err)
		st, err := store.State(ctx)
		require.NoError(t, err)
		digest, err := store.StateDigest(ctx)
		require.NoError(t, err)
		require.NotEqual(t, st.Digest(), digest)
	})

	t.Run("a store from before the digest says to migrate, and migrating seals it", func(t *testing.T) {
		store, b := setupStore(t)
		_, err := store.ApplyRelease(ctx, b.manifest(t, "L"), "tester")
		require.NoError(t, err)
		newest, err := store.Report(ctx, 1)
		require.NoError(t, err)
		// Before migrations 002 (the digest) and 005 (the runner's mark).
		q := `"` + store.Schema() + `"`
		_, err = store.DB().Exec(`ALTER TABLE ` + q + `.epoch DROP COLUMN state_digest; ALTER TABLE ` + q + `.releases DROP COLUMN contracting_by;
			DELETE FROM ` + q + `.schema_migrations WHERE version IN (2, 5)`)
		require.NoError(t, err)
		var storeVersion int
		require.NoError(t, store.DB().Get(&storeVersion, `SELECT max(version) FROM `+q+`.schema_migrations`))

		rep, err := store.Report(ctx, 1)
		require.NoError(t, err)
		require.Equal(t, storeVersion, rep.StoreVersion, "status tells the truth about the store")
		require.Equal(t, newest.Version, rep.Version)

		before := snapshotTables(t, store)
		_, err = store.Flip(ctx, "L", phase.Migrate, schema.FlipOptions{})
		require.ErrorIs(t, err, schema.ErrNotMigrated)
		require.ErrorContains(t, err, "phasecast migrate")
		require.Equal(t, before, snapshotTables(t, store), "the refused flip wrote nothing")

		res, err := store.Migrate(ctx)
		require.NoError(t, err)
		require.Equal(t, []int{2, 5}, res.Applied)
		requireSealed(t, store)
		rep, err = store.Report(ctx, 1)
		require.NoError(t, err)
		require.Equal(t, rep.Version, rep.StoreVersion)
		_, err = store.Flip(ctx, "L", phase.Migrate, schema.FlipOptions{})
		require.NoError(t, err)
		requireSealed(t, store)
	})
}

// TestAgentsRowsUpdateInPlace: every status rewrites its agent's row, so
// the agents table has no index a status changes (lease_expires_at had
// one) and leaves room in each page, which lets PostgreSQL update the
// rows heap-only (HOT) instead of bloating the table and its indexes
// (migration 009). After many batches over the same agents the table
// stays the size of a few versions of each row.
func TestAgentsRowsUpdateInPlace(t *testing.T) {
	ctx := context.Background()
	store := testenv.Store(t)
	var indexes []string
	require.NoError(t, store.DB().Select(&indexes, `SELECT indexdef FROM pg_indexes WHERE schemaname = $1 AND tablename = 'agents'`, store.Schema()))
	require.Len(t, indexes, 1, "the primary key only: %q", indexes)
	require.Contains(t, indexes[0], "(id)")
	var options []string
	require.NoError(t, store.DB().Get(pq.Array(&options), `SELECT coalesce(reloptions, '{}') FROM pg_class WHERE oid = $1::regclass`, `"`+store.Schema()+`".agents`))
	require.Contains(t, options, "fillfactor=70")

	statuses := make([]wire.Status, 200)
	for i := range statuses {
		statuses[i] = testenv.Credentials(wire.Status{V: wire.StatusVersion, Kind: wire.KindStatus, AgentID: fmt.Sprintf("hot-%03d", i),
			Service: "svc", Host: "h", PID: i, Releases: []string{"L"}, Seq: 1, SentAt: time.Now()})
	}
	var first int64
	for round := range 40 {
		for i := range statuses {
			statuses[i].Seq++
		}
		rec, err := store.RecordStatusBatch(ctx, statuses, 10*time.Second)
		require.NoError(t, err)
		require.Len(t, rec.Kept, len(statuses))
		if round == 0 {
			require.NoError(t, store.DB().Get(&first, `SELECT pg_relation_size($1::regclass)`, `"`+store.Schema()+`".agents`))
		}
	}
	var last int64
	require.NoError(t, store.DB().Get(&last, `SELECT pg_relation_size($1::regclass)`, `"`+store.Schema()+`".agents`))
	t.Logf("agents table: %d kB after one batch, %d kB after 40", first>>10, last>>10)
	require.Less(t, last, 8*first, "40 rounds of updates bloated the table: %d bytes, from %d", last, first)
}
