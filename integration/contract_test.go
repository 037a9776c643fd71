package integration

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/cmd/phasecast/cli"
	"github.com/phasecast/phasecast/integration/harness"
	"github.com/phasecast/phasecast/internal/config"
	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/schema"
)

// Issue "Contract runner and the demo": the runner against live agents
// and services, through the library and the CLI.

// TestContractUnderLoad: twenty services with live workers follow release
// L from expand to complete; not one query fails and the columns are gone.
func TestContractUnderLoad(t *testing.T) {
	e2eHeavy(t, 70) // twenty services with three connections each, and the rest
	e := e2eSetup(t)
	e.createInstances()
	e.apply(e2eReleaseL) // expand
	e.startBroadcaster(true, nil)

	load := e.startLoad(20, 2)

	e.toMigrate() // migrate, then the backfill
	epoch := e.flipChecked("L")
	res, err := e.store.Contract(e.ctx, "L", schema.ContractOptions{Timeout: 30 * time.Second, PollInterval: 20 * time.Millisecond, LeaderWithin: 5 * time.Second, Actor: "test"})
	require.NoError(t, err)
	require.Equal(t, schema.OutcomeComplete, res.Outcome)
	require.Equal(t, epoch, res.ContractEpoch)
	require.Len(t, res.Acked, 20)
	require.Empty(t, res.Missing)
	require.Empty(t, res.OldCode)
	q := schema.QuoteTable(e.table)
	require.Equal(t, []string{q + `."name"`, q + `."display_name"`}, res.Dropped)
	require.Equal(t, phase.Complete, e.phase("L"))

	// Traffic after the drop must succeed too.
	load.waitQueries(200)
	totals := load.stop()
	t.Logf("%d queries, %d failed, %d refused; waited %s for acknowledgements, DDL %s in %d attempt(s)",
		totals.Queries, totals.Failed, totals.Refused, res.Waited.Round(time.Millisecond), res.DDLEnd.Sub(res.DDLStart).Round(time.Millisecond), res.Attempts)

	require.Equal(t, []string{"id", "host", "common_name"}, e.columns("instances"))
}

// e2eContractJSON is what 'phasecast contract --json' prints.
type e2eContractJSON = harness.ContractJSON

// e2eDecodeOne decodes exactly one JSON document from s.
func e2eDecodeOne(t *testing.T, s string, v any) {
	t.Helper()
	harness.DecodeOne(t, s, v)
}

// TestContractTimesOutOnOpenGuard: an agent holding a guard open past
// --timeout makes the runner exit 2 naming it, with nothing dropped; once
// the guard exits, the same command contracts.
func TestContractTimesOutOnOpenGuard(t *testing.T) {
	t.Parallel()
	e := e2eSetup(t)
	e.createInstances()
	e.apply(e2eReleaseL)
	e.startBroadcaster(true, nil)
	held := e.startAgent(e.agentConfig("nova-held", true))
	acker := e.startAgent(e.agentConfig("nova-acker", true))
	e.toMigrate()

	g, err := held.Enter()
	require.NoError(t, err)
	exited := false
	defer func() {
		if !exited {
			g.Exit()
		}
	}()
	epoch := e.flipChecked("L")
	e.waitDrained(epoch, acker)

	start := time.Now()
	code, out, errOut := e.cli("contract", "L", "--timeout", "2s")
	require.Equal(t, cli.ExitTimeout, code, "stdout:\n%s\nstderr:\n%s", out, errOut)
	require.GreaterOrEqual(t, time.Since(start), 2*time.Second)
	require.Contains(t, errOut, "timed out")
	require.Contains(t, errOut, held.ID())
	require.NotContains(t, errOut, acker.ID(), "the agent that acknowledged is not named as missing")
	require.Contains(t, out, "waiting for: "+held.ID())
	require.Contains(t, out, "release L: timeout")
	require.Equal(t, []string{"id", "name", "display_name", "host", "common_name"}, e.columns("instances"), "nothing dropped")
	require.Equal(t, phase.Contract, e.phase("L"))

	code, out, errOut = e.cli("contract", "L", "--timeout", "2s", "--json")
	require.Equal(t, cli.ExitTimeout, code, errOut)
	var doc e2eContractJSON
	e2eDecodeOne(t, out, &doc)
	require.Equal(t, cli.ExitTimeout, doc.ExitCode)
	require.Equal(t, schema.OutcomeTimeout, doc.Outcome)
	require.Contains(t, doc.Error, held.ID())
	require.Len(t, doc.Missing, 1)
	require.Equal(t, held.ID(), doc.Missing[0].ID)
	require.Equal(t, "nova-held", doc.Missing[0].Service)
	require.Len(t, doc.Acked, 1)
	require.Equal(t, acker.ID(), doc.Acked[0].ID)
	require.Empty(t, doc.Dropped)
	require.Equal(t, epoch, doc.ContractEpoch)
	require.Len(t, e.columns("instances"), 5, "nothing dropped")
	require.Equal(t, phase.Contract, e.phase("L"))

	g.Exit()
	exited = true
	code, out, errOut = e.cli("contract", "L", "--timeout", "10s")
	require.Zero(t, code, "stdout:\n%s\nstderr:\n%s", out, errOut)
	require.Contains(t, out, "release L: complete")
	require.Equal(t, []string{"id", "host", "common_name"}, e.columns("instances"))
}

// e2eReleaseT removes one column of @app.t, a table no service uses.
const e2eReleaseT = `release: L
removed:
  - table: @app.t
    columns: [name]
`

// TestContractDryRunAndStrict: --dry-run prints the DDL and changes
// nothing; --strict refuses while a session outside any agent is
// connected, and names it.
func TestContractDryRunAndStrict(t *testing.T) {
	t.Parallel()
	e := e2eSetup(t)
	e.exec(`CREATE TABLE @app.t (id int PRIMARY KEY, name text, note text)`, `INSERT INTO @app.t VALUES (1, 'one', 'first')`)
	e.apply(e2eReleaseT)
	e.flip("L", phase.Migrate)
	code, _, errOut := e.cli("flip", "L", "contract")
	require.Zero(t, code, errOut)
	e.startBroadcaster(true, nil)
	e2eWaitFor(t, e2eWait, "the broadcaster to publish the flip", func() bool {
		n, err := e.store.UnpublishedEpoch(e.ctx)
		require.NoError(t, err)
		return n == 0
	})
	before, cols := e.storeRows(), e.columns("t")

	code, out, errOut := e.cli("contract", "L", "--dry-run")
	require.Zero(t, code, "stdout:\n%s\nstderr:\n%s", out, errOut)
	require.Contains(t, out, "release L: dry_run")
	require.Contains(t, out, "DDL:\n  ALTER TABLE \""+e.app+"\".\"t\" DROP COLUMN IF EXISTS \"name\";\n")
	require.Equal(t, before, e.storeRows(), "a dry run changes nothing in the store")
	require.Equal(t, cols, e.columns("t"), "a dry run drops nothing")
	require.Equal(t, phase.Contract, e.phase("L"))

	// An outside session: as psql would be, in the middle of a query that
	// names the column about to go.
	dsn, err := config.WithApplicationName(testenv.DatabaseURL(), "psql")
	require.NoError(t, err)
	psqlDB, err := sql.Open("postgres", dsn)
	require.NoError(t, err)
	defer psqlDB.Close()
	psql, err := psqlDB.Conn(e.ctx)
	require.NoError(t, err)
	defer psql.Close()
	_, err = psql.ExecContext(e.ctx, `SET search_path = `+e.app)
	require.NoError(t, err)
	var pid int
	require.NoError(t, psql.QueryRowContext(e.ctx, `SELECT pg_backend_pid()`).Scan(&pid))
	queryCtx, cancelQuery := context.WithCancel(e.ctx)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancelQuery() // no need to sit out the sleep once the test is done
	wg.Go(func() {
		rows, err := psql.QueryContext(queryCtx, `SELECT pg_sleep(3), "name" FROM t`)
		if err == nil {
			for rows.Next() {
			}
			_ = rows.Close()
		}
	})
	e2eWaitFor(t, e2eWait, "the psql session to run its query", func() bool {
		var active bool
		require.NoError(t, e.db.GetContext(e.ctx, &active, `SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND state = 'active' AND query LIKE '%pg_sleep%')`, pid))
		return active
	})

	code, out, errOut = e.cli("contract", "L", "--strict")
	require.NotZero(t, code, "stdout:\n%s\nstderr:\n%s", out, errOut)
	require.Contains(t, errOut, "sessions outside any agent")
	require.Contains(t, errOut, "run without --strict")
	require.Contains(t, out, fmt.Sprintf(`outside session: pid %d, application "psql"`, pid))
	for l := range strings.Lines(out) {
		if strings.Contains(l, fmt.Sprintf("pid %d,", pid)) {
			require.Contains(t, l, "NAMES A REMOVED COLUMN", l)
			require.Contains(t, l, `SELECT pg_sleep(3), "name" FROM t`, l)
		}
	}
	require.Equal(t, cols, e.columns("t"), "a refused run drops nothing")
	require.Equal(t, phase.Contract, e.phase("L"))
}

// TestContractResumesAfterCrash: a release left in contracting by a
// runner that died after taking it there, before the DDL, is completed by
// 'phasecast contract'.
func TestContractResumesAfterCrash(t *testing.T) {
	t.Parallel()
	e := e2eSetup(t)
	e.exec(`CREATE TABLE @app.t (id int PRIMARY KEY, name text, note text)`)
	e.apply(e2eReleaseT)
	e.flip("L", phase.Migrate)
	e.flip("L", phase.Contract)
	require.NoError(t, e.store.TouchBroadcaster(e.ctx, schema.Broadcaster{ID: "b", Host: "h", PID: 1, Leader: true}))
	crash := errors.New("simulated crash")
	res, err := e.store.Contract(e.ctx, "L", schema.ContractOptions{Actor: "test", BeforeDDL: func() error { return crash }})
	require.ErrorIs(t, err, crash)
	require.Equal(t, schema.OutcomeFailed, res.Outcome)
	require.Equal(t, phase.Contracting, e.phase("L"))
	require.Equal(t, []string{"id", "name", "note"}, e.columns("t"), "the runner stopped before the DDL")

	code, out, errOut := e.cli("contract", "L")
	require.Zero(t, code, "stdout:\n%s\nstderr:\n%s", out, errOut)
	require.Contains(t, out, "release L: complete")
	require.Contains(t, out, `dropped: "`+e.app+`"."t"."name"`)
	require.Equal(t, []string{"id", "note"}, e.columns("t"))
	require.Equal(t, phase.Complete, e.phase("L"))

	code, out, errOut = e.cli("contract", "L")
	require.Zero(t, code, errOut)
	require.Contains(t, out, "release L: already_complete")
}
