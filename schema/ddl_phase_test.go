package schema_test

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lib/pq"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/internal/wire"
	"github.com/phasecast/phasecast/schema"
)

// TestContractNotStuckWhenRemovedTableIsGone: a removal whose table was
// dropped elsewhere counts as done instead of failing every re-run.
func TestContractNotStuckWhenRemovedTableIsGone(t *testing.T) {
	t.Parallel()
	b := setupContract(t)
	b.instances()
	b.exec(`CREATE TABLE APP.legacy (id int, note text)`)
	_, epoch := b.toContract(`
release: L
removed:
  - table: APP.legacy
    columns: [note]
  - table: APP.instances
    columns: [name, display_name]
`)
	b.leader()
	b.agent(agentSpec{id: "a", drained: epoch, releases: []string{"L"}})

	q := pq.QuoteIdentifier(b.app)
	legacy := schema.Gone{Removal: b.app + ".legacy", Name: q + `."legacy"`}
	displayName := schema.Gone{Removal: b.app + ".instances", Column: "display_name", Name: q + `."instances"."display_name"`}

	// The runner crashed in contracting; meanwhile another release, or
	// someone by hand, dropped the table and one of the columns.
	crash := errors.New("simulated crash")
	_, err := b.store.Contract(b.ctx, "L", fast(schema.ContractOptions{BeforeDDL: func() error { return crash }}))
	require.ErrorIs(t, err, crash)
	require.Equal(t, phase.Contracting, b.phase("L"))
	b.exec(`DROP TABLE APP.legacy`, `ALTER TABLE APP.instances DROP COLUMN display_name`)

	// The plan says so...
	res, err := b.store.Contract(b.ctx, "L", fast(schema.ContractOptions{DryRun: true}))
	require.NoError(t, err)
	require.Equal(t, []schema.Gone{legacy, displayName}, res.AlreadyGone)
	require.Equal(t, `table `+q+`."legacy"`, legacy.Object())

	// ...and the run counts those parts as done.
	var logs bytes.Buffer
	res, err = b.store.Contract(b.ctx, "L", fast(schema.ContractOptions{Log: zerolog.New(&logs)}))
	require.NoError(t, err)
	require.Equal(t, schema.OutcomeComplete, res.Outcome)
	require.Equal(t, phase.Complete, b.phase("L"))
	require.Equal(t, []string{"instances.id", "instances.common_name"}, b.columns())
	require.Equal(t, []string{q + `."instances"."name"`}, res.Dropped)
	require.Equal(t, []schema.Gone{legacy, displayName}, res.AlreadyGone)
	require.Contains(t, logs.String(), "already gone")
	require.Contains(t, logs.String(), "DDL skipped")

	t.Run("FlipChecksSayIt", func(t *testing.T) {
		b := setupContract(t)
		b.instances()
		b.toMigrate(`
release: G
removed:
  - table: APP.no_such_table
    columns: [a]
  - table: APP.instances
    columns: [name, no_such_column]
`)
		var gone []schema.Gone
		_, err := b.store.Flip(b.ctx, "G", phase.Contract, schema.FlipOptions{Check: b.store.ContractCheck(schema.ContractCheckOptions{
			Gone: func(g schema.Gone) { gone = append(gone, g) }})})
		require.NoError(t, err)
		q := pq.QuoteIdentifier(b.app)
		require.Equal(t, []schema.Gone{
			{Removal: b.app + ".no_such_table", Name: q + `."no_such_table"`},
			{Removal: b.app + ".instances", Column: "no_such_column", Name: q + `."instances"."no_such_column"`},
		}, gone)
	})
}

// TestContractCascadeRefusesDependentsNotInPlan: an object that starts to
// depend on a removed column after the plan listed the dependents is not
// dropped by CASCADE.
func TestContractCascadeRefusesDependentsNotInPlan(t *testing.T) {
	t.Parallel()
	b := setupContract(t)
	b.instances()
	b.exec(`CREATE VIEW APP.v_names AS SELECT id, name FROM APP.instances`)
	_, epoch := b.toContract(`
release: L
removed:
  - table: APP.instances
    columns: [name, display_name]
    cascade: true
`)
	b.leader()
	b.agent(agentSpec{id: "a", drained: epoch, releases: []string{"L"}})

	created := false
	res, err := b.store.Contract(b.ctx, "L", fast(schema.ContractOptions{
		// The plan's dependents are listed before the wait; the new view
		// appears while the runner waits.
		Progress: func(schema.Progress) {
			if !created {
				created = true
				b.exec(`CREATE VIEW APP.v_display AS SELECT id, display_name FROM APP.instances`)
			}
		},
	}))
	require.True(t, created)
	require.ErrorIs(t, err, schema.ErrUnsafe)
	var changed *schema.DependentsChangedError
	require.ErrorAs(t, err, &changed)
	q := pq.QuoteIdentifier(b.app)
	require.Len(t, changed.Added, 1)
	require.Equal(t, `view `+q+`."v_display"`, changed.Added[0].Object())
	require.Equal(t, "display_name", changed.Added[0].Column)
	require.Contains(t, err.Error(), `view `+q+`."v_display" (on column "display_name")`)
	require.Contains(t, err.Error(), "nothing of this removal was dropped")
	require.Equal(t, schema.OutcomeFailed, res.Outcome)
	require.Len(t, res.Dependents, 1)
	require.Equal(t, `view `+q+`."v_names"`, res.Dependents[0].Object())
	require.Empty(t, res.Dropped)
	require.Equal(t, phase.Contracting, b.phase("L"))
	var views []string
	require.NoError(t, b.db.Select(&views, `SELECT viewname FROM pg_views WHERE schemaname = $1 ORDER BY 1`, b.app))
	require.Equal(t, []string{"v_display", "v_names"}, views)
	require.Subset(t, b.columns(), []string{"instances.name", "instances.display_name"})

	// A new view on a view the plan lists counts too.
	b.exec(`DROP VIEW APP.v_display`, `CREATE VIEW APP.v_on_names AS SELECT name FROM APP.v_names`)
	_, err = b.store.Contract(b.ctx, "L", fast(schema.ContractOptions{
		BeforeDDL: func() error {
			b.exec(`CREATE VIEW APP.v_on_on AS SELECT name FROM APP.v_on_names`)
			return nil
		},
	}))
	require.ErrorAs(t, err, &changed)
	require.Len(t, changed.Added, 1)
	require.Equal(t, `view `+q+`."v_on_on"`, changed.Added[0].Object())
	require.Equal(t, phase.Contracting, b.phase("L"))

	// Re-run, the plan lists them and they go with the columns, along
	// with a materialized view and a foreign key, which the DROP's
	// transaction looks at the same way.
	b.exec(`CREATE MATERIALIZED VIEW APP.mv_display AS SELECT display_name FROM APP.instances`,
		`ALTER TABLE APP.instances ADD CONSTRAINT instances_name_key UNIQUE (name)`,
		`CREATE TABLE APP.child (id int, instance_name text CONSTRAINT child_fk REFERENCES APP.instances (name))`)
	res, err = b.store.Contract(b.ctx, "L", fast(schema.ContractOptions{}))
	require.NoError(t, err)
	require.Equal(t, schema.OutcomeComplete, res.Outcome)
	require.Len(t, res.Dependents, 5)
	require.Equal(t, []string{"child.id", "child.instance_name", "instances.id", "instances.common_name"}, b.columns())
	require.Equal(t, []string{"class child r", "class instances r", "class instances_pkey i", "constraint instances_pkey p"}, b.catalog())
}

// TestContractDDLDeadlineAndLateOldCode: DDL retries on lock timeouts stop
// at a deadline, and old code that registers meanwhile is reported.
func TestContractDDLDeadlineAndLateOldCode(t *testing.T) {
	t.Parallel()
	b, _ := setupAcked(t, "a")

	blocker := b.holdLock()

	// An old-code agent registers while the DDL retries: its status is
	// recorded as the broadcaster records it, once the log says the DDL
	// is retrying.
	registered := make(chan error, 1)
	var once sync.Once
	logs := &testenv.LogBuffer{OnWrite: func(line string) {
		if strings.Contains(line, "retrying") {
			once.Do(func() {
				st := testenv.Credentials(wire.Status{V: wire.StatusVersion, Kind: wire.KindStatus, AgentID: "old", Service: "svc-old", Host: "host-old",
					PID: 4343, Version: "v0.9", Releases: []string{"K"}, Seq: 1, SentAt: time.Now()})
				_, _, err := b.store.RecordStatuses(context.Background(), []wire.Status{st}, time.Minute)
				registered <- err
			})
		}
	}}

	ctx, cancel := context.WithTimeout(b.ctx, 20*time.Second)
	defer cancel()
	const ddlTimeout = 1500 * time.Millisecond
	start := time.Now()
	res, err := b.store.Contract(ctx, "L", fast(schema.ContractOptions{LockTimeout: 100 * time.Millisecond, DDLTimeout: ddlTimeout,
		Log: zerolog.New(logs)}))
	took := time.Since(start)
	require.NoError(t, <-registered)
	require.ErrorIs(t, err, schema.ErrDDLTimeout)
	var te *schema.DDLTimeoutError
	require.ErrorAs(t, err, &te)
	require.Contains(t, err.Error(), "passed its deadline of 1.5s (--ddl-timeout)")
	require.Contains(t, err.Error(), "run 'phasecast contract L' again")
	require.Contains(t, err.Error(), "old: service svc-old on host-old, pid 4343")
	require.GreaterOrEqual(t, took, ddlTimeout)
	require.Less(t, took, ddlTimeout+3*time.Second)
	require.Greater(t, res.Attempts, 2)
	require.Equal(t, schema.OutcomeDDLTimeout, res.Outcome)
	require.Len(t, res.OldCodeDuringDDL, 1)
	old := res.OldCodeDuringDDL[0]
	require.Equal(t, []any{"old", "svc-old", "host-old", 4343}, []any{old.ID, old.Service, old.Host, old.PID})
	require.Equal(t, te.OldCode, res.OldCodeDuringDDL)
	require.Contains(t, logs.String(), `"service":"svc-old","host":"host-old","pid":4343`)
	require.Contains(t, logs.String(), "appeared during the DDL")
	require.Equal(t, 1, strings.Count(logs.String(), "appeared during the DDL"), "reported once")
	doc, err := json.Marshal(res)
	require.NoError(t, err)
	require.Contains(t, string(doc), `"old_code_during_ddl":[{"id":"old","service":"svc-old","host":"host-old","pid":4343`)

	// Nothing was dropped and the release can be run again.
	require.Equal(t, phase.Contracting, b.phase("L"))
	require.Equal(t, []string{"instances.id", "instances.name", "instances.display_name", "instances.common_name"}, b.columns())
	_, err = blocker.ExecContext(b.ctx, `ROLLBACK`)
	require.NoError(t, err)
	res, err = b.store.Contract(b.ctx, "L", fast(schema.ContractOptions{DDLTimeout: ddlTimeout}))
	require.NoError(t, err)
	require.Equal(t, schema.OutcomeComplete, res.Outcome)
	require.Equal(t, []string{"instances.id", "instances.common_name"}, b.columns())
}

// holdLock begins a transaction that holds a lock on the instances table
// that the DROP conflicts with, as a long transaction of a service would;
// it ends when the connection is closed, or by COMMIT or ROLLBACK on it.
func (b *contractBundle) holdLock() *sql.Conn {
	b.t.Helper()
	blocker, err := b.db.Conn(b.ctx)
	require.NoError(b.t, err)
	b.t.Cleanup(func() { blocker.Close() })
	_, err = blocker.ExecContext(b.ctx, `BEGIN`)
	require.NoError(b.t, err)
	_, err = blocker.ExecContext(b.ctx, `LOCK TABLE `+pq.QuoteIdentifier(b.app)+`.instances IN ACCESS SHARE MODE`)
	require.NoError(b.t, err)
	return blocker
}
