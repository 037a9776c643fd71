package python

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/cmd/phasecast/cli"
	"github.com/phasecast/phasecast/cmd/phasecast/fleet"
	"github.com/phasecast/phasecast/examples/novalike"
	"github.com/phasecast/phasecast/integration/harness"
	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/schema"
)

// mixedConfig: the Python services run their agent's default heartbeat
// (2s) and lease margin (1s), as the Go binary's test runs them, so the
// broadcaster grants 5s leases; the Go services in this process beat
// faster.
var mixedConfig = harness.Config{
	Actor: "test",
	Lease: 5 * time.Second, Beacon: 400 * time.Millisecond, Liveness: 200 * time.Millisecond, Poll: 200 * time.Millisecond,
	Heartbeat: 300 * time.Millisecond, LeaseMargin: 300 * time.Millisecond,
	Wait: 30 * time.Second,
}

// mixed is one test's fleet: Go novalike services in this process and
// Python novalike.py processes, against one signing broadcaster.
type mixed struct {
	e      *harness.Env
	goSvcs *fleet.Services
	pySvcs *fleet.PythonServices
	ids    []string // every agent, Go and Python
}

// startMixed starts the broadcaster, goN Go services and the Python
// services python configures (release L applied, in expand), and waits
// until the Go services run queries.
func startMixed(t *testing.T, goN int, python []fleet.PythonConfig) *mixed {
	t.Helper()
	requirePython(t, fleet.PythonModules)
	dir := pythonDir(t)
	e := harness.New(t, mixedConfig)
	// Signed states and grants, and the test's role and broker user
	// allowed to enrol agents: as an operator sets up production.
	require.NoError(t, e.Fleet.Secure(e.Ctx))
	e.CreateInstances()
	e.Apply(harness.ReleaseL)
	e.StartBroadcaster(true, nil)

	m := &mixed{e: e}
	ctx, cancel := context.WithTimeout(e.Ctx, 2*time.Minute)
	defer cancel()
	var err error
	m.goSvcs, err = fleet.StartServices(ctx, goN, func(i int) novalike.Config {
		return e.ServiceConfig(fmt.Sprintf("nova-go-%d", i), 2)
	})
	require.NoError(t, err)
	t.Cleanup(func() { _, _ = m.goSvcs.Stop(context.Background()) })
	m.pySvcs, err = e.Fleet.StartPythonServices(ctx, len(python), func(i int) fleet.PythonConfig {
		cfg := python[i]
		cfg.Dir, cfg.Table = dir, e.Table
		return cfg
	})
	require.NoError(t, err)
	t.Cleanup(func() {
		// Bounded: a process that does not exit is killed.
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if _, err := m.pySvcs.Stop(ctx); err != nil && t.Failed() {
			t.Log(err)
		}
	})
	for _, s := range m.goSvcs.List {
		m.ids = append(m.ids, s.Agent().ID())
	}
	m.ids = append(m.ids, m.pySvcs.IDs()...)
	harness.WaitFor(t, mixedConfig.Wait, "the Go services to run queries", func() bool {
		for _, s := range m.goSvcs.List {
			if s.Result().Queries == 0 {
				return false
			}
		}
		return true
	})
	return m
}

// toContract takes L to migrate with the backfill, waits until the agents
// in acking acknowledged it, then flips L to contract through the CLI
// (preconditions and safety checks) and returns the contract epoch.
func (m *mixed) toContract(acking []string) int64 {
	e := m.e
	e.T.Helper()
	epoch := e.Flip("L", phase.Migrate)
	e.Exec(`UPDATE @app.instances SET common_name = coalesce(name, display_name) WHERE common_name IS NULL`)
	e.WaitDrained(epoch, acking...)
	code, out, errOut := e.CLI("flip", "L", "contract", "--json")
	require.Zero(e.T, code, "flip L contract:\n%s\n%s", out, errOut)
	contract, err := e.Store.Epoch(e.Ctx)
	require.NoError(e.T, err)
	require.Greater(e.T, contract, epoch)
	return contract
}

// stop stops both sides and requires that not one query failed on either
// and that every service ran queries; it returns the Python results.
func (m *mixed) stop() []novalike.Result {
	t := m.e.T
	t.Helper()
	ctx, cancel := context.WithTimeout(m.e.Ctx, time.Minute)
	defer cancel()
	goTotals, err := m.goSvcs.Stop(ctx)
	require.NoError(t, err)
	require.Zero(t, goTotals.Failed, "Go failures: %v", goTotals.Failures)
	for _, s := range m.goSvcs.List {
		require.Positive(t, s.Result().Queries, s.Agent().ID())
	}
	pyTotals, err := m.pySvcs.Stop(ctx)
	require.NoError(t, err)
	require.Zero(t, pyTotals.Failed, "Python failures: %v", pyTotals.Failures)
	for i, r := range m.pySvcs.Results {
		p := m.pySvcs.List[i]
		require.Equal(t, p.ID(), r.ID, "the summary names the process's agent")
		require.Positive(t, r.Queries, "%s ran no query; its log:\n%s", r.ID, p.Log())
	}
	t.Logf("Go: %d queries, %d failed, %d refused; Python: %d queries, %d failed, %d refused",
		goTotals.Queries, goTotals.Failed, goTotals.Refused, pyTotals.Queries, pyTotals.Failed, pyTotals.Refused)
	return m.pySvcs.Results
}

func agentIDs(agents []schema.Agent) []string {
	out := make([]string, len(agents))
	for i, a := range agents {
		out[i] = a.ID
	}
	return out
}

// TestMixedFleet: Go and Python services under one broadcaster, through
// expand → migrate → contract → complete while their workers read and
// write. The runner counts every Python agent's acknowledgement, the
// columns go, and not one query failed on either side.
func TestMixedFleet(t *testing.T) {
	m := startMixed(t, 2, []fleet.PythonConfig{{Service: "nova-py-0"}, {Service: "nova-py-1"}})
	e := m.e
	time.Sleep(500 * time.Millisecond) // traffic under expand

	contractEpoch := m.toContract(m.ids)
	code, out, errOut := e.CLI("contract", "L", "--timeout", "60s", "--json")
	require.Zero(t, code, "contract L:\n%s\n%s", out, errOut)
	var doc harness.ContractJSON
	harness.DecodeOne(t, out, &doc)
	require.Equal(t, schema.OutcomeComplete, doc.Outcome)
	require.Equal(t, contractEpoch, doc.ContractEpoch)
	acked := agentIDs(doc.Acked)
	for _, id := range m.ids {
		require.Contains(t, acked, id, "the runner counted %s's acknowledgement", id)
	}
	require.Empty(t, doc.Missing)
	require.Empty(t, doc.OldCode)
	for _, s := range doc.OutsideSessions {
		for _, id := range m.pySvcs.IDs() {
			require.NotEqual(t, "phasecast:"+id, s.ApplicationName, "a Python service's session counts as its live agent's")
		}
	}
	require.Equal(t, []string{"id", "host", "common_name"}, e.Columns("instances"))
	require.Equal(t, phase.Complete, e.Phase("L"))

	// The store, as 'phasecast status --json' shows it, holds each Python
	// agent live, built for L, past the contract epoch, vouched for.
	code, out, errOut = e.CLI("status", "--json")
	require.Zero(t, code, errOut)
	var rep schema.Report
	require.NoError(t, json.Unmarshal([]byte(out), &rep), out)
	for n, id := range m.pySvcs.IDs() {
		i := slices.IndexFunc(rep.Agents, func(a schema.Agent) bool { return a.ID == id })
		require.GreaterOrEqual(t, i, 0, "status lists %s", id)
		a := rep.Agents[i]
		require.Equal(t, fmt.Sprintf("nova-py-%d", n), a.Service)
		require.True(t, a.Live(), id)
		require.True(t, a.Knows("L"), id)
		require.GreaterOrEqual(t, a.DrainedEpoch, contractEpoch, id)
		require.Equal(t, "phasecast:"+id, a.AppName, id)
		require.NotEmpty(t, a.VouchedBy, id)
	}

	// Traffic after the drop counts too; so that every service reports
	// the final epoch, each acknowledges it first.
	final, err := e.Store.Epoch(e.Ctx)
	require.NoError(t, err)
	e.WaitDrained(final, m.ids...)
	time.Sleep(500 * time.Millisecond)
	for _, r := range m.stop() {
		require.Equal(t, final, r.Epoch, r.ID)
	}
}

// TestMixedFleetGuardHeldPastTimeout: a Python service holding a guard
// open past the runner's --timeout keeps its agent from acknowledging, so
// the runner exits 2 naming that agent alone, and drops nothing.
func TestMixedFleetGuardHeldPastTimeout(t *testing.T) {
	m := startMixed(t, 1, []fleet.PythonConfig{
		{Service: "nova-py-held", HoldGuard: 5 * time.Minute},
		{Service: "nova-py-acker"},
	})
	e := m.e
	held := m.pySvcs.List[0].ID()
	var others []string
	for _, id := range m.ids {
		if id != held {
			others = append(others, id)
		}
	}
	contractEpoch := m.toContract(others)
	e.WaitDrained(contractEpoch, others...)

	start := time.Now()
	code, out, errOut := e.CLI("contract", "L", "--timeout", "3s", "--json")
	require.Equal(t, cli.ExitTimeout, code, "stdout:\n%s\nstderr:\n%s", out, errOut)
	require.GreaterOrEqual(t, time.Since(start), 3*time.Second)
	var doc harness.ContractJSON
	harness.DecodeOne(t, out, &doc)
	require.Equal(t, cli.ExitTimeout, doc.ExitCode)
	require.Equal(t, schema.OutcomeTimeout, doc.Outcome)
	require.Contains(t, doc.Error, held, "the error names the Python agent holding the guard")
	require.Equal(t, []string{held}, agentIDs(doc.Missing))
	require.ElementsMatch(t, others, agentIDs(doc.Acked))
	require.Equal(t, "nova-py-held", doc.Missing[0].Service)
	require.Empty(t, doc.Dropped)
	require.Equal(t, []string{"id", "name", "display_name", "host", "common_name"}, e.Columns("instances"), "nothing dropped")
	require.Equal(t, phase.Contract, e.Phase("L"))

	// The plain output says so too.
	code, out, errOut = e.CLI("contract", "L", "--timeout", "1s")
	require.Equal(t, cli.ExitTimeout, code, errOut)
	require.Contains(t, errOut, held)
	require.Contains(t, out, "waiting for: "+held)
	m.stop()
}
