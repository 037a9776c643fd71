package integration

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lib/pq"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/cmd/phasecast/cli"
	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/schema"
)

// 'phasecast contract L --exec CMD': the team's own contract tool runs in
// place of phasecast's DDL, gated by the same wait, lock and checks.

// execReady takes release L to contract with one acknowledging agent, and
// returns the contract epoch.
func (e *e2eEnv) execReady() int64 {
	e.t.Helper()
	e.createInstances()
	e.apply(e2eReleaseL)
	e.startBroadcaster(true, nil)
	a := e.startAgent(e.agentConfig("nova-api", true))
	e.toMigrate()
	epoch := e.flipChecked("L")
	e.waitDrained(epoch, a)
	return epoch
}

// psqlDrop is a contract command that drops columns of @app.instances with
// psql, through the URL the runner gives it.
func (e *e2eEnv) psqlDrop(columns ...string) string {
	drops := make([]string, len(columns))
	for i, c := range columns {
		drops[i] = "DROP COLUMN IF EXISTS " + c
	}
	return fmt.Sprintf(`psql "$PHASECAST_DATABASE_URL" -v ON_ERROR_STOP=1 -qc 'ALTER TABLE %s %s'`, e.table, strings.Join(drops, ", "))
}

// TestContractExecLeavingAColumnStaysContracting: a command that exits 0
// but leaves a removed column in place does not complete the release; the
// message names the column, and a re-run with a command that drops it
// completes.
func TestContractExecLeavingAColumnStaysContracting(t *testing.T) {
	t.Parallel()
	e := e2eSetup(t)
	e.execReady()

	code, out, errOut := e.cli("contract", "L", "--timeout", "15s", "--exec", e.psqlDrop("display_name"))
	require.Equal(t, cli.ExitError, code, "stdout:\n%s\nstderr:\n%s", out, errOut)
	q := schema.QuoteTable(e.table)
	require.Contains(t, errOut, `the contract command exited 0 but left column `+q+`."name" in place`)
	require.Contains(t, errOut, "the release stays in contracting")
	require.NotContains(t, errOut, `"display_name" in place`)
	require.Equal(t, phase.Contracting, e.phase("L"))
	require.Equal(t, []string{"id", "name", "host", "common_name"}, e.columns("instances"))

	code, out, errOut = e.cli("contract", "L", "--timeout", "15s", "--exec", e.psqlDrop("name", "display_name"))
	require.Zero(t, code, "stdout:\n%s\nstderr:\n%s", out, errOut)
	require.Contains(t, out, "release L: complete")
	require.Contains(t, out, "dropped by the contract command: "+q+`."name"`)
	require.Equal(t, phase.Complete, e.phase("L"))
	require.Equal(t, []string{"id", "host", "common_name"}, e.columns("instances"))
}

// TestContractExecFailureIsReportedAndRerunWorks: a command that fails has
// its exit status and output reported (the database password masked), the
// release stays in contracting, and a re-run runs the command again.
func TestContractExecFailureIsReportedAndRerunWorks(t *testing.T) {
	t.Parallel()
	e := e2eSetup(t)
	epoch := e.execReady()

	// Trust authentication ignores the password, so it can be any.
	const password = "pw-never-shown"
	u, err := url.Parse(testenv.DatabaseURL())
	require.NoError(t, err)
	u.User = url.UserPassword(u.User.Username(), password)
	withPassword := u.String()
	failing := `echo "release=$PHASECAST_RELEASE epoch=$PHASECAST_EPOCH url=$DATABASE_URL same=$([ "$DATABASE_URL" = "$PHASECAST_DATABASE_URL" ] && echo yes)"; echo "cannot contract" >&2; exit 3 # ` + password

	code, out, errOut := e.cli("--database-url", withPassword, "--log-level", "info", "contract", "L", "--timeout", "15s", "--exec", failing)
	require.Equal(t, cli.ExitError, code, "stdout:\n%s\nstderr:\n%s", out, errOut)
	require.Contains(t, errOut, fmt.Sprintf("exec| release=L epoch=%d url=postgres://postgres:xxxxx@", epoch))
	require.Contains(t, errOut, "same=yes")
	require.Contains(t, errOut, "exec| cannot contract")
	require.Contains(t, errOut, `the contract command exited with status 3; its last line: "cannot contract"`)
	require.NotContains(t, errOut+out, password, "the password is never shown")
	require.Contains(t, out, "exit status 3")
	require.Equal(t, phase.Contracting, e.phase("L"))
	require.Equal(t, []string{"id", "name", "display_name", "host", "common_name"}, e.columns("instances"))

	// Again, for machines: the same failure in the one JSON document.
	code, out, errOut = e.cli("--database-url", withPassword, "contract", "L", "--json", "--exec", failing)
	require.Equal(t, cli.ExitError, code, "stdout:\n%s\nstderr:\n%s", out, errOut)
	var doc e2eContractJSON
	e2eDecodeOne(t, out, &doc)
	require.Equal(t, schema.OutcomeExecFailed, doc.Outcome)
	require.NotNil(t, doc.Exec)
	require.Equal(t, 3, doc.Exec.ExitCode)
	require.Equal(t, strings.ReplaceAll(failing, password, "xxxxx"), doc.Exec.Command, "the command is shown without the password it names")
	require.Equal(t, "cannot contract", doc.Exec.Tail[len(doc.Exec.Tail)-1])
	require.NotContains(t, out+errOut, password)
	require.Equal(t, phase.Contracting, e.phase("L"))

	// The re-run resumes in contracting and runs the command again.
	code, out, errOut = e.cli("contract", "L", "--exec", e.psqlDrop("name", "display_name"))
	require.Zero(t, code, "stdout:\n%s\nstderr:\n%s", out, errOut)
	require.Equal(t, phase.Complete, e.phase("L"))
	require.Equal(t, []string{"id", "host", "common_name"}, e.columns("instances"))
}

// TestContractExecKilledAtDDLTimeout: a command still running at
// --ddl-timeout is killed, with its process group, and the run exits 5
// with the release in contracting.
func TestContractExecKilledAtDDLTimeout(t *testing.T) {
	t.Parallel()
	e := e2eSetup(t)
	e.execReady()
	pidFile := filepath.Join(t.TempDir(), "pid")
	start := time.Now()
	code, out, errOut := e.cli("contract", "L", "--ddl-timeout", "1s", "--exec", `sh -c 'echo $$ > `+pidFile+`; exec sleep 60' & wait`)
	require.Equal(t, cli.ExitDDLTimeout, code, "stdout:\n%s\nstderr:\n%s", out, errOut)
	require.Less(t, time.Since(start), 30*time.Second)
	require.Contains(t, errOut, "the contract command was killed at the DDL phase's deadline of 1s (--ddl-timeout)")
	require.Equal(t, phase.Contracting, e.phase("L"))
	b, err := os.ReadFile(pidFile)
	require.NoError(t, err)
	pid := strings.TrimSpace(string(b))
	require.Eventually(t, func() bool { return !processRuns(pid) }, 5*time.Second, 10*time.Millisecond, "the command's background child %s is gone", pid)
}

// TestContractExecKilledWhenRunnerStops: a runner stopped (SIGINT) while
// the command runs kills it and its process group, and leaves the
// release in contracting; a re-run runs the command again.
func TestContractExecKilledWhenRunnerStops(t *testing.T) {
	t.Parallel()
	e := e2eSetup(t)
	e.execReady()
	dir := t.TempDir()
	pidFile := filepath.Join(dir, "pid")
	ctx, stop := context.WithCancel(e.ctx)
	defer stop()
	var stdout, stderr testenv.LogBuffer
	exited := make(chan int, 1)
	go func() {
		exited <- e.h.CLIWith(ctx, &stdout, &stderr, "contract", "L", "--exec", `sh -c 'echo $$ > `+pidFile+`; exec sleep 60' & wait`)
	}()
	e2eWaitFor(t, e2eWait, "the command to start", func() bool {
		b, err := os.ReadFile(pidFile)
		return err == nil && len(strings.TrimSpace(string(b))) > 0
	})
	b, err := os.ReadFile(pidFile)
	require.NoError(t, err)
	pid := strings.TrimSpace(string(b))
	stop()
	select {
	case code := <-exited:
		require.Equal(t, cli.ExitError, code, "stdout:\n%s\nstderr:\n%s", stdout.String(), stderr.String())
	case <-time.After(e2eWait):
		t.Fatal("the runner did not stop")
	}
	require.Contains(t, stderr.String(), "the contract command was stopped with the runner (signal ")
	require.Eventually(t, func() bool { return !processRuns(pid) }, 5*time.Second, 10*time.Millisecond, "the command's background child %s is gone", pid)
	require.Equal(t, phase.Contracting, e.phase("L"))

	code, out, errOut := e.cli("contract", "L", "--exec", e.psqlDrop("name", "display_name"))
	require.Zero(t, code, "stdout:\n%s\nstderr:\n%s", out, errOut)
	require.Equal(t, phase.Complete, e.phase("L"))
}

// processRuns reports whether process pid exists and is not a zombie
// waiting to be reaped by whoever adopted it.
func processRuns(pid string) bool {
	stat, err := os.ReadFile("/proc/" + pid + "/stat")
	if err != nil {
		return false
	}
	// pid (comm) state ...: comm may hold spaces, the state follows its ")".
	s := string(stat)
	i := strings.LastIndexByte(s, ')')
	return i < 0 || i+2 >= len(s) || s[i+2] != 'Z'
}

// alembicDir is the Alembic project of these tests: expand and contract
// branches, the contract one dropping release L's columns.
func alembicDir(t *testing.T) string {
	t.Helper()
	dir, err := filepath.Abs(filepath.Join("testdata", "alembic"))
	require.NoError(t, err)
	return dir
}

// alembic is the command line of the Alembic project for the test's
// application schema. Debian's python3-alembic is seen only by
// /usr/bin/python3.
func (e *e2eEnv) alembic(args string) string {
	return fmt.Sprintf("PYTHONDONTWRITEBYTECODE=1 APP_SCHEMA=%s /usr/bin/python3 -m alembic -c %s/alembic.ini %s", e.app, alembicDir(e.t), args)
}

// e2eReleaseAlembic is release L as a team using Alembic writes it: the
// expand branch adds common_name, so the manifest says only what must
// hold before contract and what goes.
const e2eReleaseAlembic = `release: L
description: merge name and display_name into common_name (alembic expand and contract branches)
preconditions:
  - name: every instance has a common_name
    sql: SELECT 1 FROM @app.instances WHERE common_name IS NULL LIMIT 1
removed:
  - table: @app.instances
    columns: [name, display_name]
`

// TestContractExecRunsAlembicContractAfterLastAck: with services running
// their workers, 'phasecast contract L --exec "alembic upgrade
// contract@head"' never starts the command while an agent running code
// that predates L is live, and runs it once the last live agent has
// acknowledged: the release completes, the columns are gone, and not one
// query failed.
func TestContractExecRunsAlembicContractAfterLastAck(t *testing.T) {
	e2eHeavy(t, 40) // six services with three connections each, and the rest
	e := e2eSetup(t)
	e.createInstances()
	expand := exec.Command("sh", "-c", e.alembic("upgrade expand@head"))
	expand.Env = append(os.Environ(), "PHASECAST_DATABASE_URL="+testenv.DatabaseURL())
	outExpand, err := expand.CombinedOutput()
	require.NoError(t, err, "alembic upgrade expand@head:\n%s", outExpand)
	require.Equal(t, []string{"id", "name", "display_name", "host", "common_name"}, e.columns("instances"))
	e.apply(e2eReleaseAlembic)
	e.startBroadcaster(true, nil)

	oldCfg := e.agentConfig("nova-compute-old", true)
	oldCfg.Releases = []string{"K"}
	old := e.startAgent(oldCfg)

	load := e.startLoad(6, 2)

	e.toMigrate()
	flipped, err := e.store.Flip(e.ctx, "L", phase.Contract, schema.FlipOptions{Actor: "test",
		Check: e.store.ContractCheck(schema.ContractCheckOptions{Force: true})})
	require.NoError(t, err)

	// The command proves it ran after every live agent's ack: it counts,
	// in the store, the live agents that have not acknowledged the epoch
	// it was given.
	started := filepath.Join(t.TempDir(), "started")
	contract := fmt.Sprintf(`touch %s
psql "$PHASECAST_DATABASE_URL" -v ON_ERROR_STOP=1 -Atc "SELECT 'unacknowledged=' || count(*) FROM %s.agents WHERE lease_expires_at > now() AND NOT ('L' = ANY (releases) AND drained_epoch >= $PHASECAST_EPOCH)"
%s`, started, pq.QuoteIdentifier(e.store.Schema()), e.alembic("upgrade contract@head"))

	code, out, errOut := e.cli("contract", "L", "--timeout", "2s", "--exec", contract)
	require.Equal(t, cli.ExitTimeout, code, "stdout:\n%s\nstderr:\n%s", out, errOut)
	require.Contains(t, errOut, "1 running code that predates L ("+old.ID())
	require.NoFileExists(t, started, "the contract command never starts while old code is live")
	require.Equal(t, phase.Contract, e.phase("L"))
	require.Equal(t, []string{"id", "name", "display_name", "host", "common_name"}, e.columns("instances"))

	e2eStopAgent(t, old) // its goodbye ends its lease
	code, out, errOut = e.cli("contract", "L", "--timeout", "30s", "--json", "--exec", contract)
	require.Zero(t, code, "stdout:\n%s\nstderr:\n%s", out, errOut)
	var doc e2eContractJSON
	e2eDecodeOne(t, out, &doc)
	require.Equal(t, schema.OutcomeComplete, doc.Outcome)
	require.Equal(t, flipped.Epoch, doc.ContractEpoch)
	require.Len(t, doc.Acked, 6)
	require.NotNil(t, doc.Exec)
	require.Zero(t, doc.Exec.ExitCode)
	require.Contains(t, doc.Exec.Tail, "unacknowledged=0")
	require.Contains(t, strings.Join(doc.Exec.Tail, "\n"), "Running upgrade  -> c1")
	require.False(t, doc.Exec.Started.Before(doc.AckedAt), "the command started at %s, before the last ack was seen at %s", doc.Exec.Started, doc.AckedAt)
	q := schema.QuoteTable(e.table)
	require.Equal(t, []string{q + `."name"`, q + `."display_name"`}, doc.Dropped)
	require.Contains(t, errOut, "exec| unacknowledged=0")
	require.Equal(t, phase.Complete, e.phase("L"))
	require.Equal(t, []string{"id", "host", "common_name"}, e.columns("instances"))
	var version string
	require.NoError(t, e.db.GetContext(e.ctx, &version, e.sql(`SELECT version_num FROM @app.alembic_version`)))
	require.Equal(t, "c1", version)

	load.waitQueries(100)
	totals := load.stop()
	t.Logf("%d queries, %d failed; waited %s for acknowledgements; alembic ran for %s",
		totals.Queries, totals.Failed, doc.Waited.Round(time.Millisecond), doc.Exec.Duration.Round(time.Millisecond))
}
