package schema_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
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

// contractBundle is one test's store plus an application schema of its own
// holding the tables the releases remove from.
type contractBundle struct {
	t     *testing.T
	ctx   context.Context
	store *schema.Store
	db    *sqlx.DB
	app   string // unquoted application schema
	seq   atomic.Uint64
}

func setupContract(t *testing.T) *contractBundle {
	t.Helper()
	store := testenv.Store(t)
	b := &contractBundle{t: t, ctx: context.Background(), store: store, db: store.DB(), app: testenv.Name("app")}
	b.exec(`CREATE SCHEMA ` + pq.QuoteIdentifier(b.app))
	t.Cleanup(func() { testenv.DropSchema(t, b.db, b.app) })
	return b
}

// setupAcked is the common start of a runner test: the instances table,
// release L in contract, a leading broadcaster, and one live agent, id,
// that acknowledged the contract flip, whose epoch it returns.
func setupAcked(t *testing.T, id string) (*contractBundle, int64) {
	t.Helper()
	return setupAckedRelease(t, id, releaseL)
}

// setupAckedRelease is setupAcked with the release described by yaml.
func setupAckedRelease(t *testing.T, id, yaml string) (*contractBundle, int64) {
	t.Helper()
	b := setupContract(t)
	b.instances()
	_, epoch := b.toContract(yaml)
	b.leader()
	b.agent(agentSpec{id: id, drained: epoch, releases: []string{"L"}})
	return b, epoch
}

// exec runs statements; "APP" in them is the quoted application schema.
func (b *contractBundle) exec(stmts ...string) {
	b.t.Helper()
	for _, s := range stmts {
		_, err := b.db.ExecContext(b.ctx, strings.ReplaceAll(s, "APP", pq.QuoteIdentifier(b.app)))
		require.NoError(b.t, err, s)
	}
}

// manifest parses YAML in which APP is the unquoted application schema.
func (b *contractBundle) manifest(yaml string) *schema.Manifest {
	b.t.Helper()
	m, err := schema.ParseManifest("test.yaml", []byte(strings.ReplaceAll(yaml, "APP", b.app)))
	require.NoError(b.t, err)
	return m
}

// toContract applies the release and flips it to migrate and then contract
// (no checks), returning the contract epoch.
func (b *contractBundle) toContract(yaml string) (*schema.Manifest, int64) {
	b.t.Helper()
	m := b.toMigrate(yaml)
	res, err := b.store.Flip(b.ctx, m.Release, phase.Contract, schema.FlipOptions{Actor: "test"})
	require.NoError(b.t, err)
	return m, res.Epoch
}

func (b *contractBundle) toMigrate(yaml string) *schema.Manifest {
	b.t.Helper()
	m := b.manifest(yaml)
	_, err := b.store.ApplyRelease(b.ctx, m, "test")
	require.NoError(b.t, err)
	_, err = b.store.Flip(b.ctx, m.Release, phase.Migrate, schema.FlipOptions{Actor: "test"})
	require.NoError(b.t, err)
	return m
}

type agentSpec struct {
	id       string
	drained  int64
	releases []string
	lease    time.Duration
	appName  string
}

// agent records one agent status, with its lease.
func (b *contractBundle) agent(a agentSpec) {
	b.t.Helper()
	if a.lease == 0 {
		a.lease = time.Minute
	}
	st := testenv.Credentials(wire.Status{V: wire.StatusVersion, Kind: wire.KindStatus, AgentID: a.id, Service: "svc-" + a.id, Host: "host-" + a.id,
		PID: 4242, Version: "v1.2.3", Releases: a.releases, Seq: b.seq.Add(1), AppliedEpoch: a.drained,
		DrainedEpoch: a.drained, AppName: a.appName, SentAt: time.Now()})
	_, recorded, err := b.store.RecordStatuses(b.ctx, []wire.Status{st}, a.lease)
	require.NoError(b.t, err)
	require.Equal(b.t, []string{a.id}, recorded)
}

func (b *contractBundle) leader() {
	b.t.Helper()
	require.NoError(b.t, b.store.TouchBroadcaster(b.ctx, schema.Broadcaster{ID: "b1", Host: "h", PID: 1, Leader: true}))
}

// columns lists every column of the application schema as "table.column".
func (b *contractBundle) columns() []string {
	b.t.Helper()
	var cols []string
	require.NoError(b.t, b.db.SelectContext(b.ctx, &cols, `
		SELECT table_name || '.' || column_name FROM information_schema.columns
		WHERE table_schema = $1 ORDER BY table_name, ordinal_position`, b.app))
	return cols
}

func (b *contractBundle) phase(release string) phase.Phase {
	b.t.Helper()
	rel, err := b.store.Release(b.ctx, release)
	require.NoError(b.t, err)
	return rel.Phase
}

type auditRow struct {
	From  *string   `db:"from_phase"`
	To    string    `db:"to_phase"`
	Actor string    `db:"actor"`
	At    time.Time `db:"at"`
}

func (b *contractBundle) audit(release string) []auditRow {
	b.t.Helper()
	var rows []auditRow
	require.NoError(b.t, b.db.SelectContext(b.ctx, &rows, `SELECT from_phase, to_phase, actor, at FROM `+
		pq.QuoteIdentifier(b.store.Schema())+`.audit WHERE release = $1 ORDER BY id`, release))
	return rows
}

// fast are options that keep tests short.
func fast(o schema.ContractOptions) schema.ContractOptions {
	if o.PollInterval == 0 {
		o.PollInterval = 20 * time.Millisecond
	}
	if o.Timeout == 0 {
		o.Timeout = 10 * time.Second
	}
	return o
}

func without(all []string, drop ...string) []string {
	var out []string
	for _, c := range all {
		keep := true
		for _, d := range drop {
			keep = keep && c != d
		}
		if keep {
			out = append(out, c)
		}
	}
	return out
}

const releaseL = `
release: L
removed:
  - table: APP.instances
    columns: [name, display_name]
`

func (b *contractBundle) instances() {
	b.exec(`CREATE TABLE APP.instances (id int PRIMARY KEY, name text, display_name text, common_name text)`,
		`INSERT INTO APP.instances SELECT g, 'n' || g, 'd' || g, 'c' || g FROM generate_series(1, 100) g`)
}

func TestContract(t *testing.T) {
	t.Parallel()

	t.Run("HappyPathThenAlreadyComplete", func(t *testing.T) {
		t.Parallel()
		b, epoch := setupAcked(t, "a1")
		b.agent(agentSpec{id: "a2", drained: epoch + 5, releases: []string{"K", "L"}})
		before := b.columns()

		var progress []schema.Progress
		res, err := b.store.Contract(b.ctx, "L", fast(schema.ContractOptions{Actor: "deployer", Progress: func(p schema.Progress) { progress = append(progress, p) }}))
		require.NoError(t, err)
		require.Equal(t, schema.OutcomeComplete, res.Outcome)
		require.Equal(t, phase.Complete, res.Phase)
		require.Equal(t, epoch, res.ContractEpoch)
		require.Len(t, res.Acked, 2)
		require.Empty(t, res.Missing)
		require.Equal(t, 1, res.Attempts)
		q := pq.QuoteIdentifier(b.app) + `."instances"`
		require.Equal(t, []string{q + `."name"`, q + `."display_name"`}, res.Dropped)
		require.Equal(t, without(before, "instances.name", "instances.display_name"), b.columns())
		require.Equal(t, phase.Complete, b.phase("L"))
		require.False(t, res.DDLStart.Before(res.AckedAt))
		require.False(t, res.DDLEnd.Before(res.DDLStart))
		require.NotEmpty(t, progress)
		require.Equal(t, 2, progress[len(progress)-1].Acked)

		audit := b.audit("L")
		require.GreaterOrEqual(t, len(audit), 2)
		last := audit[len(audit)-2:]
		require.Equal(t, "contract", *last[0].From)
		require.Equal(t, "contracting", last[0].To)
		require.Equal(t, "contracting", *last[1].From)
		require.Equal(t, "complete", last[1].To)
		require.Equal(t, "deployer", last[0].Actor)
		require.Equal(t, "deployer", last[1].Actor)

		res, err = b.store.Contract(b.ctx, "L", fast(schema.ContractOptions{}))
		require.NoError(t, err)
		require.Equal(t, schema.OutcomeAlreadyComplete, res.Outcome)
		require.Len(t, b.audit("L"), len(audit))
	})

	t.Run("UnackedAgentTimesOut", func(t *testing.T) {
		t.Parallel()
		b, epoch := setupAcked(t, "acked")
		b.agent(agentSpec{id: "laggard", drained: epoch - 1, releases: []string{"L"}})
		before := b.columns()

		res, err := b.store.Contract(b.ctx, "L", fast(schema.ContractOptions{Timeout: 300 * time.Millisecond}))
		require.ErrorIs(t, err, schema.ErrAckTimeout)
		var te *schema.AckTimeoutError
		require.ErrorAs(t, err, &te)
		require.Len(t, te.Missing, 1)
		require.Equal(t, "laggard", te.Missing[0].ID)
		require.Empty(t, te.OldCode)
		require.Contains(t, err.Error(), "laggard: service svc-laggard on host-laggard")
		require.Contains(t, err.Error(), "nothing was dropped")
		require.Equal(t, schema.OutcomeTimeout, res.Outcome)
		require.GreaterOrEqual(t, res.Waited, 300*time.Millisecond)
		require.Equal(t, before, b.columns())
		require.Equal(t, phase.Contract, b.phase("L"))
	})

	t.Run("ProceedsOnlyAfterLeaseExpires", func(t *testing.T) {
		t.Parallel()
		b, epoch := setupAcked(t, "acked")
		b.agent(agentSpec{id: "partitioned", drained: epoch - 1, releases: []string{"L"}, lease: 1200 * time.Millisecond})
		agents, err := b.store.Agents(b.ctx)
		require.NoError(t, err)
		var expires time.Time
		for _, a := range agents {
			if a.ID == "partitioned" {
				expires = a.LeaseExpiresAt
			}
		}
		require.False(t, expires.IsZero())

		res, err := b.store.Contract(b.ctx, "L", fast(schema.ContractOptions{}))
		require.NoError(t, err)
		require.Equal(t, schema.OutcomeComplete, res.Outcome)
		require.Greater(t, res.Waited, 500*time.Millisecond)
		// The flip to contracting happened after the lease ran out, on the
		// database clock.
		var contracting time.Time
		for _, a := range b.audit("L") {
			if a.To == "contracting" {
				contracting = a.At
			}
		}
		require.False(t, contracting.Before(expires), "contracting at %s, lease expired at %s", contracting, expires)
	})

	t.Run("OldCodeIsNamedAndWaitedFor", func(t *testing.T) {
		t.Parallel()
		b := setupContract(t)
		b.instances()
		m := b.toMigrate(releaseL)
		b.leader()
		b.agent(agentSpec{id: "old", drained: 1000, releases: []string{"K"}})

		// The flip to contract refuses without Force...
		_, err := b.store.Flip(b.ctx, "L", phase.Contract, schema.FlipOptions{Check: b.store.ContractCheck(schema.ContractCheckOptions{})})
		require.ErrorIs(t, err, schema.ErrUnsafe)
		var ue *schema.UnsafeError
		require.ErrorAs(t, err, &ue)
		require.Len(t, ue.Problems, 1)
		p := ue.Problems[0]
		require.Equal(t, schema.ProblemOldCode, p.Kind)
		for _, s := range []string{"agent old", "service svc-old", "host host-old", "pid 4242", `version "v1.2.3"`, `predates release "L"`} {
			require.Contains(t, p.Detail, s)
		}
		require.Equal(t, phase.Migrate, b.phase("L"))

		// ...and lets it through with Force, warning.
		var warned []schema.Problem
		res, err := b.store.Flip(b.ctx, "L", phase.Contract, schema.FlipOptions{Check: b.store.ContractCheck(schema.ContractCheckOptions{
			Force: true, Warn: func(p schema.Problem) { warned = append(warned, p) }})})
		require.NoError(t, err)
		require.Equal(t, []schema.Problem{p}, warned)

		// The runner waits for it: old code never counts as acknowledged.
		b.agent(agentSpec{id: "new", drained: res.Epoch, releases: []string{"L"}})
		before := b.columns()
		_, err = b.store.Contract(b.ctx, m.Release, fast(schema.ContractOptions{Timeout: 300 * time.Millisecond}))
		var te *schema.AckTimeoutError
		require.ErrorAs(t, err, &te)
		require.Empty(t, te.Missing)
		require.Len(t, te.OldCode, 1)
		require.Equal(t, "old", te.OldCode[0].ID)
		require.Contains(t, err.Error(), "running code that predates L (old: service svc-old")
		require.Equal(t, before, b.columns())
	})

	t.Run("NoBroadcaster", func(t *testing.T) {
		t.Parallel()
		for _, tc := range []struct {
			name   string
			setup  func(b *contractBundle)
			within time.Duration
		}{
			{name: "none", setup: func(*contractBundle) {}},
			{name: "standby only", setup: func(b *contractBundle) {
				require.NoError(t, b.store.TouchBroadcaster(b.ctx, schema.Broadcaster{ID: "s", Host: "h", PID: 2}))
			}},
			{name: "leader silent too long", within: 50 * time.Millisecond, setup: func(b *contractBundle) {
				b.leader()
				time.Sleep(150 * time.Millisecond)
			}},
		} {
			t.Run(tc.name, func(t *testing.T) {
				t.Parallel()
				b := setupContract(t)
				b.instances()
				_, epoch := b.toContract(releaseL)
				b.agent(agentSpec{id: "a", drained: epoch, releases: []string{"L"}})
				tc.setup(b)
				before := b.columns()
				res, err := b.store.Contract(b.ctx, "L", fast(schema.ContractOptions{LeaderWithin: tc.within}))
				require.ErrorIs(t, err, schema.ErrNoBroadcaster)
				require.Contains(t, err.Error(), "phasecast broadcast")
				require.Equal(t, schema.OutcomeRefused, res.Outcome)
				require.Equal(t, before, b.columns())
				require.Equal(t, phase.Contract, b.phase("L"))
			})
		}
	})

	t.Run("LockTimeoutRetriesWithoutStallingTraffic", func(t *testing.T) {
		t.Parallel()
		b, _ := setupAcked(t, "a")

		// A long transaction holds a lock the DROP conflicts with.
		blocker := b.holdLock()
		const hold = 1500 * time.Millisecond
		released := make(chan struct{})
		go func() {
			defer close(released)
			time.Sleep(hold)
			_, _ = blocker.ExecContext(context.Background(), `COMMIT`)
		}()

		// Meanwhile, live traffic reads other rows of the table.
		traffic, err := sqlx.Open("postgres", testenv.DatabaseURL())
		require.NoError(t, err)
		defer traffic.Close()
		stop := make(chan struct{})
		var wg sync.WaitGroup
		var maxLatency atomic.Int64
		var queries atomic.Int64
		for w := range 2 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; ; i++ {
					select {
					case <-stop:
						return
					default:
					}
					start := time.Now()
					var v sql.NullString
					if err := traffic.QueryRowContext(b.ctx, `SELECT common_name FROM `+pq.QuoteIdentifier(b.app)+`.instances WHERE id = $1`, 1+(i*2+w)%100).Scan(&v); err != nil {
						// The table changes shape under the query only after
						// the DROP; a failure here would be a real problem.
						t.Errorf("traffic query: %v", err)
						return
					}
					queries.Add(1)
					if l := time.Since(start).Nanoseconds(); l > maxLatency.Load() {
						maxLatency.Store(l)
					}
					time.Sleep(5 * time.Millisecond)
				}
			}()
		}

		start := time.Now()
		res, err := b.store.Contract(b.ctx, "L", fast(schema.ContractOptions{LockTimeout: 200 * time.Millisecond}))
		close(stop)
		wg.Wait()
		<-released
		require.NoError(t, err)
		t.Logf("attempts %d, %d traffic queries, max latency %s", res.Attempts, queries.Load(), time.Duration(maxLatency.Load()))
		require.Equal(t, schema.OutcomeComplete, res.Outcome)
		require.Greater(t, res.Attempts, 1)
		require.GreaterOrEqual(t, time.Since(start), hold-100*time.Millisecond)
		require.Greater(t, queries.Load(), int64(20))
		require.Less(t, time.Duration(maxLatency.Load()), time.Second, "traffic stalled behind the DROP")
		require.Equal(t, []string{"instances.id", "instances.common_name"}, b.columns())
	})

	t.Run("CrashBetweenContractingAndComplete", func(t *testing.T) {
		t.Parallel()
		b, epoch := setupAcked(t, "a")

		crash := errors.New("simulated crash")
		res, err := b.store.Contract(b.ctx, "L", fast(schema.ContractOptions{BeforeComplete: func() error { return crash }}))
		require.ErrorIs(t, err, crash)
		require.Equal(t, schema.OutcomeFailed, res.Outcome)
		require.Equal(t, phase.Contracting, b.phase("L"))
		require.Equal(t, []string{"instances.id", "instances.common_name"}, b.columns())

		// An agent that shows up unacknowledged now does not hold up the
		// resumed run: contracting was entered with every agent acked.
		b.agent(agentSpec{id: "late", drained: epoch - 1, releases: []string{"L"}})
		res, err = b.store.Contract(b.ctx, "L", fast(schema.ContractOptions{Timeout: 200 * time.Millisecond}))
		require.NoError(t, err)
		require.Equal(t, schema.OutcomeComplete, res.Outcome)
		require.Empty(t, res.Dropped) // the first run dropped them
		require.Equal(t, 1, res.Attempts)
		require.Equal(t, phase.Complete, b.phase("L"))
	})

	t.Run("IdentifiersNeedingQuotes", func(t *testing.T) {
		t.Parallel()
		b := setupContract(t)
		mixed := "App Schema " + strings.TrimPrefix(testenv.Name("x"), "x_")
		b.exec(`CREATE SCHEMA ` + pq.QuoteIdentifier(mixed))
		t.Cleanup(func() { testenv.DropSchema(t, b.db, mixed) })
		qs := pq.QuoteIdentifier(mixed)
		b.exec(`CREATE TABLE `+qs+`."Mixed Table" (id int, "Display Name" text, "UPPER" text, upper text, "ümlaut" text, "keep Me" text)`,
			`CREATE TABLE `+qs+`."Other" ("Display Name" text, "UPPER" text)`,
			`CREATE TABLE `+qs+`."Gone Table" (x int)`,
			`CREATE TABLE `+qs+`."gone table" (x int)`)
		cols := func() []string {
			var cols []string
			require.NoError(t, b.db.Select(&cols, `SELECT table_name || '.' || column_name FROM information_schema.columns
				WHERE table_schema = $1 ORDER BY table_name, ordinal_position`, mixed))
			return cols
		}
		before := cols()
		res, err := b.store.ApplyRelease(b.ctx, b.manifest(fmt.Sprintf(`
release: Q
removed:
  - schema: %q
    table: Mixed Table
    columns: ["Display Name", "UPPER", "ümlaut"]
  - table: %q
`, mixed, mixed+".Gone Table")), "test")
		require.NoError(t, err)
		_, err = b.store.Flip(b.ctx, "Q", phase.Migrate, schema.FlipOptions{})
		require.NoError(t, err)
		flip, err := b.store.Flip(b.ctx, "Q", phase.Contract, schema.FlipOptions{Check: b.store.ContractCheck(schema.ContractCheckOptions{})})
		require.NoError(t, err)
		require.Greater(t, flip.Epoch, res.Epoch)
		b.leader()

		cr, err := b.store.Contract(b.ctx, "Q", fast(schema.ContractOptions{}))
		require.NoError(t, err)
		require.Equal(t, schema.OutcomeComplete, cr.Outcome)
		require.Equal(t, []string{
			qs + `."Mixed Table"."Display Name"`, qs + `."Mixed Table"."UPPER"`, qs + `."Mixed Table"."ümlaut"`,
			qs + `."Gone Table"`,
		}, cr.Dropped)
		require.Equal(t, without(before, "Mixed Table.Display Name", "Mixed Table.UPPER", "Mixed Table.ümlaut", "Gone Table.x"), cols())
	})

	t.Run("OutsideSessions", func(t *testing.T) {
		t.Parallel()
		b := setupContract(t)
		b.instances()
		_, epoch := b.toContract(releaseL)
		b.leader()
		b.agent(agentSpec{id: "a", drained: epoch, releases: []string{"L"}, appName: "svc_" + b.app})

		outside := "outside_" + b.app
		table := pq.QuoteIdentifier(b.app) + ".instances"
		done := make(chan error, 2)
		// One session nobody vouches for reads a removed column; another,
		// the agent's own service, does too and is not listed.
		for _, app := range []string{outside, "svc_" + b.app} {
			db := sessionDB(t, app)
			go func() {
				_, err := db.ExecContext(b.ctx, `SELECT pg_sleep(2), "name" FROM `+table+` LIMIT 1`)
				done <- err
			}()
		}
		require.Eventually(t, func() bool {
			var n int
			err := b.db.Get(&n, `SELECT count(*) FROM pg_stat_activity WHERE application_name IN ($1, $2) AND state = 'active'`, outside, "svc_"+b.app)
			return err == nil && n == 2
		}, 5*time.Second, 10*time.Millisecond)
		before := b.columns()

		res, err := b.store.Contract(b.ctx, "L", fast(schema.ContractOptions{Strict: true}))
		require.ErrorIs(t, err, schema.ErrOutsideSessions)
		var oe *schema.OutsideSessionsError
		require.ErrorAs(t, err, &oe)
		require.Equal(t, schema.OutcomeRefused, res.Outcome)
		require.Equal(t, res.OutsideSessions, oe.Sessions)
		// Other tests' sessions may be listed too: find ours.
		ours := findSession(t, res.OutsideSessions, outside)
		require.True(t, ours.NamesRemoved)
		require.Equal(t, "active", ours.State)
		require.Contains(t, ours.Query, "pg_sleep(2)")
		for i, s := range res.OutsideSessions {
			require.NotEqual(t, "svc_"+b.app, s.ApplicationName, "an agent's session is not outside")
			if i > 0 {
				require.False(t, s.NamesRemoved && !res.OutsideSessions[i-1].NamesRemoved, "sessions naming removed columns come first")
			}
		}
		require.Equal(t, before, b.columns())
		require.Equal(t, phase.Contract, b.phase("L"))

		// Without Strict it warns, records them, and waits for the lock.
		res, err = b.store.Contract(b.ctx, "L", fast(schema.ContractOptions{LockTimeout: 200 * time.Millisecond}))
		require.NoError(t, err)
		require.True(t, findSession(t, res.OutsideSessions, outside).NamesRemoved)
		require.Equal(t, phase.Complete, b.phase("L"))
		require.NoError(t, <-done)
		require.NoError(t, <-done)
	})

	t.Run("NotNullRefusedUntilFixed", func(t *testing.T) {
		t.Parallel()
		b := setupContract(t)
		b.exec(`CREATE TABLE APP.instances (id int PRIMARY KEY, name text NOT NULL, display_name text NOT NULL DEFAULT '')`)
		_, epoch := b.toContract(releaseL)
		b.leader()
		b.agent(agentSpec{id: "a", drained: epoch, releases: []string{"L"}})

		res, err := b.store.Contract(b.ctx, "L", fast(schema.ContractOptions{}))
		require.ErrorIs(t, err, schema.ErrUnsafe)
		var ue *schema.UnsafeError
		require.ErrorAs(t, err, &ue)
		fix := `ALTER TABLE ` + pq.QuoteIdentifier(b.app) + `."instances" ALTER COLUMN "name" DROP NOT NULL`
		require.Equal(t, []schema.Problem{{Kind: schema.ProblemNotNull, Table: b.app + ".instances", Column: "name", Fix: fix,
			Detail: `column "name" of ` + b.app + `.instances is NOT NULL without a default: inserts that stop naming it will fail once services drop it`}}, ue.Problems)
		require.Contains(t, err.Error(), fix)
		require.Equal(t, res.Problems, ue.Problems)
		require.Equal(t, phase.Contract, b.phase("L"))

		b.exec(fix)
		res, err = b.store.Contract(b.ctx, "L", fast(schema.ContractOptions{}))
		require.NoError(t, err)
		require.Equal(t, schema.OutcomeComplete, res.Outcome)
		require.Equal(t, []string{"instances.id"}, b.columns())
	})

	t.Run("DependentViewAndForeignKey", func(t *testing.T) {
		t.Parallel()
		for _, cascade := range []bool{false, true} {
			t.Run(fmt.Sprintf("cascade=%v", cascade), func(t *testing.T) {
				t.Parallel()
				b := setupContract(t)
				b.exec(`CREATE TABLE APP.parent (id int PRIMARY KEY, name text, code text UNIQUE, keep text)`,
					`CREATE TABLE APP.child (id int PRIMARY KEY, parent_code text CONSTRAINT child_code_fk REFERENCES APP.parent (code), note text)`,
					`CREATE VIEW APP.v_names AS SELECT id, name FROM APP.parent`,
					`CREATE VIEW APP.v_keep AS SELECT id, keep FROM APP.parent`,
					`CREATE INDEX parent_keep ON APP.parent (keep)`)
				_, epoch := b.toContract(fmt.Sprintf(`
release: L
removed:
  - table: APP.parent
    columns: [name, code]
    cascade: %v
`, cascade))
				b.leader()
				b.agent(agentSpec{id: "a", drained: epoch, releases: []string{"L"}})
				q := pq.QuoteIdentifier(b.app)
				wantObjects := []string{
					`foreign key "child_code_fk" on ` + q + `."child"`,
					`view ` + q + `."v_names"`,
				}
				before := b.catalog()
				res, err := b.store.Contract(b.ctx, "L", fast(schema.ContractOptions{}))
				var objects []string
				for _, d := range res.Dependents {
					objects = append(objects, d.Object())
					require.Equal(t, cascade, d.Cascade)
				}
				require.ElementsMatch(t, wantObjects, objects)
				if !cascade {
					require.ErrorIs(t, err, schema.ErrUnsafe)
					var ue *schema.UnsafeError
					require.ErrorAs(t, err, &ue)
					var problems []string
					for _, p := range ue.Problems {
						require.Equal(t, schema.ProblemDependent, p.Kind)
						require.NotEmpty(t, p.Fix)
						problems = append(problems, p.Object)
					}
					require.ElementsMatch(t, wantObjects, problems)
					require.Equal(t, before, b.catalog())
					require.Equal(t, phase.Contract, b.phase("L"))
					return
				}
				require.NoError(t, err)
				after := b.catalog()
				// The view and the foreign key went, and the unique
				// constraint on the removed column "code" (part of the
				// column), and nothing else.
				require.ElementsMatch(t, []string{
					"class v_names v", "constraint child_code_fk f",
					"class parent_code_key i", "constraint parent_code_key u",
				}, diff(before, after))
				require.Empty(t, diff(after, before))
			})
		}
	})

	t.Run("DryRunChangesNothing", func(t *testing.T) {
		t.Parallel()
		b, epoch := setupAcked(t, "acked")
		b.agent(agentSpec{id: "missing", drained: epoch - 1, releases: []string{"L"}})
		before, audit := b.columns(), b.audit("L")
		epochBefore, err := b.store.Epoch(b.ctx)
		require.NoError(t, err)

		res, err := b.store.Contract(b.ctx, "L", fast(schema.ContractOptions{DryRun: true}))
		require.NoError(t, err)
		require.Equal(t, schema.OutcomeDryRun, res.Outcome)
		require.Equal(t, []string{`ALTER TABLE ` + pq.QuoteIdentifier(b.app) + `."instances" DROP COLUMN IF EXISTS "name", DROP COLUMN IF EXISTS "display_name"`}, res.DDL)
		require.Len(t, res.Acked, 1)
		require.Len(t, res.Missing, 1)
		require.Equal(t, "missing", res.Missing[0].ID)
		require.Equal(t, phase.Contract, res.Phase)
		require.Equal(t, epoch, res.ContractEpoch)
		require.Zero(t, res.Attempts)

		require.Equal(t, before, b.columns())
		require.Equal(t, audit, b.audit("L"))
		epochAfter, err := b.store.Epoch(b.ctx)
		require.NoError(t, err)
		require.Equal(t, epochBefore, epochAfter)
		require.Equal(t, phase.Contract, b.phase("L"))
	})

	t.Run("OneRunnerPerRelease", func(t *testing.T) {
		t.Parallel()
		b, _ := setupAcked(t, "a")

		other, err := b.db.Conn(b.ctx)
		require.NoError(t, err)
		defer other.Close()
		_, err = other.ExecContext(b.ctx, `SELECT pg_advisory_lock(hashtext($1))`, b.store.LockKey("contract:L"))
		require.NoError(t, err)
		_, err = b.store.Contract(b.ctx, "L", fast(schema.ContractOptions{}))
		require.ErrorIs(t, err, schema.ErrRunnerBusy)
		require.Contains(t, err.Error(), `release "L"`)
		require.Equal(t, phase.Contract, b.phase("L"))

		_, err = other.ExecContext(b.ctx, `SELECT pg_advisory_unlock(hashtext($1))`, b.store.LockKey("contract:L"))
		require.NoError(t, err)
		res, err := b.store.Contract(b.ctx, "L", fast(schema.ContractOptions{}))
		require.NoError(t, err)
		require.Equal(t, schema.OutcomeComplete, res.Outcome)
	})

	t.Run("RefusedOutsideContract", func(t *testing.T) {
		t.Parallel()
		b := setupContract(t)
		b.instances()
		b.toMigrate(releaseL)
		b.leader()
		res, err := b.store.Contract(b.ctx, "L", fast(schema.ContractOptions{}))
		require.ErrorIs(t, err, schema.ErrRefused)
		require.Contains(t, err.Error(), "phasecast flip L contract")
		require.Equal(t, schema.OutcomeRefused, res.Outcome)
		require.Equal(t, phase.Migrate, b.phase("L"))

		_, err = b.store.Contract(b.ctx, "nope", fast(schema.ContractOptions{}))
		require.ErrorIs(t, err, schema.ErrUnknownRelease)
	})

	t.Run("RollbackAndReflipWhileWaitingIsNoticed", func(t *testing.T) {
		t.Parallel()
		b, _ := setupAcked(t, "a")
		before := b.columns()

		var reflipped int64
		res, err := b.store.Contract(b.ctx, "L", fast(schema.ContractOptions{
			Timeout: 500 * time.Millisecond,
			Progress: func(p schema.Progress) {
				if reflipped != 0 {
					return
				}
				// The agent acked epoch; now the release goes back and
				// forth, so that ack no longer counts.
				_, err := b.store.Rollback(b.ctx, "L", schema.FlipOptions{})
				require.NoError(t, err)
				r, err := b.store.Flip(b.ctx, "L", phase.Contract, schema.FlipOptions{})
				require.NoError(t, err)
				reflipped = r.Epoch
			},
		}))
		require.ErrorIs(t, err, schema.ErrAckTimeout)
		var te *schema.AckTimeoutError
		require.ErrorAs(t, err, &te)
		require.Equal(t, reflipped, te.ContractEpoch)
		require.Len(t, te.Missing, 1)
		require.Equal(t, reflipped, res.ContractEpoch)
		require.Equal(t, before, b.columns())
		require.Equal(t, phase.Contract, b.phase("L"))
	})

	t.Run("InvalidOptions", func(t *testing.T) {
		t.Parallel()
		b := setupContract(t)
		_, err := b.store.Contract(b.ctx, "L", schema.ContractOptions{LockTimeout: -time.Second})
		require.ErrorContains(t, err, "ContractOptions.LockTimeout")
	})
}

// catalog lists the relations and constraints of the application schema.
func (b *contractBundle) catalog() []string {
	b.t.Helper()
	var out []string
	require.NoError(b.t, b.db.Select(&out, `
		SELECT 'class ' || c.relname || ' ' || c.relkind::text FROM pg_class c WHERE c.relnamespace = $1::regnamespace
		UNION ALL
		SELECT 'constraint ' || conname || ' ' || contype::text FROM pg_constraint WHERE connamespace = $1::regnamespace
		ORDER BY 1`, pq.QuoteIdentifier(b.app)))
	return out
}

func diff(a, b []string) []string {
	in := map[string]bool{}
	for _, x := range b {
		in[x] = true
	}
	var out []string
	for _, x := range a {
		if !in[x] {
			out = append(out, x)
		}
	}
	return out
}

// sessionDB opens a handle whose sessions carry application_name.
func sessionDB(t *testing.T, appName string) *sqlx.DB {
	t.Helper()
	url := testenv.DatabaseURL()
	sep := "?"
	if strings.Contains(url, "?") {
		sep = "&"
	}
	db, err := sqlx.Open("postgres", url+sep+"application_name="+appName)
	require.NoError(t, err)
	t.Cleanup(func() { db.Close() })
	return db
}

func findSession(t *testing.T, sessions []schema.Session, appName string) schema.Session {
	t.Helper()
	for _, s := range sessions {
		if s.ApplicationName == appName {
			return s
		}
	}
	require.Failf(t, "session not listed", "no session with application_name %q in %+v", appName, sessions)
	return schema.Session{}
}
