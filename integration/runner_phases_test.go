package integration

import (
	"strings"
	"testing"
	"time"

	"github.com/lib/pq"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/broadcaster"
	"github.com/phasecast/phasecast/cmd/phasecast/cli"
	"github.com/phasecast/phasecast/internal/phase"
)

// Defect "'phasecast flip L contracting' or 'flip L complete' is accepted
// and skips the safety steps": only the contract runner enters contracting
// and complete, and a release found in contracting without the runner's
// mark is not dropped on trust.

// TestFlipToRunnerPhasesIsRefused: 'flip L contracting' and 'flip L
// complete' are refused from every phase, say to run 'phasecast
// contract L', and change nothing.
func TestFlipToRunnerPhasesIsRefused(t *testing.T) {
	t.Parallel()
	e := e2eSetup(t)
	e.exec(`CREATE TABLE @app.t (id int PRIMARY KEY, name text, note text)`)
	e.apply(e2eReleaseT)
	for _, from := range []phase.Phase{phase.Expand, phase.Migrate, phase.Contract} {
		if from != phase.Expand {
			e.flip("L", from)
		}
		for _, to := range []string{"contracting", "complete"} {
			before := e.storeRows()
			code, out, errOut := e.cli("flip", "L", to)
			require.Equal(t, cli.ExitError, code, "flip L %s from %s: stdout:\n%s\nstderr:\n%s", to, from, out, errOut)
			require.Contains(t, errOut, "run 'phasecast contract L'", "from %s", from)
			require.Equal(t, before, e.storeRows(), "a refused flip changes nothing")
			require.Equal(t, from, e.phase("L"))
		}
	}
	require.Equal(t, []string{"id", "name", "note"}, e.columns("t"))
}

// TestContractRefusesHandFlippedContracting: a release moved to
// contracting by something other than the runner (an older binary's 'flip
// L contracting') is not dropped while a live agent has not acknowledged:
// the runner refuses, and with --recheck it waits for the agent as it
// would from contract.
func TestContractRefusesHandFlippedContracting(t *testing.T) {
	t.Parallel()
	const lease = 2 * time.Second
	e := e2eSetup(t)
	e.exec(`CREATE TABLE @app.t (id int PRIMARY KEY, name text, note text)`)
	e.apply(e2eReleaseT)
	e.startBroadcaster(true, func(c *broadcaster.Config) { c.LeaseDuration = lease })
	oldCfg := e.agentConfig("nova-compute", true)
	oldCfg.Releases = []string{"K"}
	oldCfg.InitialLease = lease
	old := e.startAgent(oldCfg)
	e.flip("L", phase.Migrate)
	code, out, errOut := e.cli("flip", "L", "contract", "--force")
	require.Zero(t, code, "stdout:\n%s\nstderr:\n%s", out, errOut)
	e.waitDrained(e.epoch(), old)
	e.flipByOlderBinary("L", phase.Contracting)

	code, out, errOut = e.cli("contract", "L", "--timeout", "2s")
	require.NotZero(t, code, "stdout:\n%s\nstderr:\n%s", out, errOut)
	require.Contains(t, errOut, "no contract runner took the release to contracting")
	require.Contains(t, errOut, "nothing was dropped")
	require.Contains(t, errOut, "phasecast contract L --recheck")
	require.Equal(t, []string{"id", "name", "note"}, e.columns("t"), "nothing dropped while an old-code agent is live")
	require.Equal(t, phase.Contracting, e.phase("L"))

	code, out, errOut = e.cli("contract", "L", "--recheck", "--timeout", "2s")
	require.Equal(t, cli.ExitTimeout, code, "stdout:\n%s\nstderr:\n%s", out, errOut)
	require.Contains(t, errOut, "1 running code that predates L ("+old.ID())
	require.Equal(t, []string{"id", "name", "note"}, e.columns("t"), "nothing dropped while an old-code agent is live")
	require.Equal(t, phase.Contracting, e.phase("L"))

	// The old instance goes; the recheck finds every live agent acked.
	e2eStopAgent(t, old)
	code, out, errOut = e.cli("contract", "L", "--recheck", "--timeout", "15s")
	require.Zero(t, code, "stdout:\n%s\nstderr:\n%s", out, errOut)
	require.Contains(t, out, "release L: complete")
	require.Equal(t, []string{"id", "note"}, e.columns("t"))
	require.Equal(t, phase.Complete, e.phase("L"))
}

// flipByOlderBinary moves a release as a binary that predates the
// runner's mark would: epoch, phase, outbox and audit rows, and nothing
// else.
func (e *e2eEnv) flipByOlderBinary(release string, to phase.Phase) {
	e.t.Helper()
	q := strings.ReplaceAll(`WITH epoch AS (UPDATE @store.epoch SET value = value + 1 RETURNING value),
		old AS (SELECT phase FROM @store.releases WHERE name = $1),
		rel AS (UPDATE @store.releases SET phase = $2, phase_epoch = epoch.value, updated_at = now()
			FROM epoch WHERE name = $1 RETURNING epoch.value AS epoch),
		ev AS (INSERT INTO @store.events (epoch, release, from_phase, to_phase) SELECT rel.epoch, $1, old.phase, $2 FROM rel, old)
		INSERT INTO @store.audit (release, from_phase, to_phase, epoch, actor) SELECT $1, old.phase, $2, rel.epoch, 'older binary' FROM rel, old`,
		"@store", pq.QuoteIdentifier(e.store.Schema()))
	res, err := e.db.ExecContext(e.ctx, q, release, string(to))
	require.NoError(e.t, err)
	n, err := res.RowsAffected()
	require.NoError(e.t, err)
	require.EqualValues(e.t, 1, n, "release %s not found", release)
}
