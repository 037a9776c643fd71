package integration

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/agent"
	"github.com/phasecast/phasecast/broadcaster"
	"github.com/phasecast/phasecast/cmd/phasecast/cli"
	"github.com/phasecast/phasecast/internal/phase"
)

// TestTwoProcessesUnderOneID: two live services configured with one agent
// ID (a hard-coded ID, a replaced pod overlapping the old one) through the
// real broadcaster and the real commands. The second one stays fenced;
// 'phasecast status' names both; the runner waits, naming the conflict,
// and drops nothing; once the first stops, the second takes the ID and
// the contract goes through.
func TestTwoProcessesUnderOneID(t *testing.T) {
	t.Parallel()
	e := e2eSetup(t)
	e.createInstances()
	e.apply(e2eReleaseL)
	e.startBroadcaster(true, nil)
	e.toMigrate()
	cfg := e.agentConfig("nova-api", true)
	cfg.ID = "nova-api-1"
	first := e.startAgent(cfg)
	epoch := e.flipChecked("L")
	e.waitDrained(epoch, first)

	second, err := agent.New(cfg)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(e.ctx, 4*e2eWait)
	defer cancel()
	started := make(chan error, 1)
	go func() { started <- second.Start(ctx) }()
	t.Cleanup(func() { e2eStopAgent(t, second) })
	e2eWaitFor(t, e2eWait, "the second process's claim in the store", func() bool {
		row, ok := e.agentRow(cfg.ID)
		return ok && len(row.Rivals) == 1
	})
	_, err = second.Enter()
	require.ErrorIs(t, err, agent.ErrStale, "the second process serves")
	g, err := first.Enter()
	require.NoError(t, err, "the holder of the ID stopped serving")
	g.Exit()

	code, out, errOut := e.cli("status")
	require.Zero(t, code, errOut)
	require.Contains(t, out, "CONFLICT nova-api-1: ID claimed by two live processes", out)
	require.Contains(t, out, "L:no (ID conflict)", out)

	code, out, errOut = e.cli("contract", "L", "--timeout", "1s")
	require.Equal(t, cli.ExitTimeout, code, "stdout:\n%s\nstderr:\n%s", out, errOut)
	require.Contains(t, out, "waiting for: nova-api-1")
	require.Contains(t, out, "ID claimed by two live processes")
	require.Contains(t, errOut, "ID claimed by two live processes")
	require.Len(t, e.columns("instances"), 5, "nothing dropped")

	e2eStopAgent(t, first) // its goodbye ends its lease: the ID is free
	require.NoError(t, <-started)
	e.waitDrained(epoch, second)
	code, out, errOut = e.cli("status")
	require.Zero(t, code, errOut)
	require.NotContains(t, out, "CONFLICT")
	code, out, errOut = e.cli("contract", "L", "--timeout", "10s")
	require.Zero(t, code, "stdout:\n%s\nstderr:\n%s", out, errOut)
	require.Equal(t, []string{"id", "host", "common_name"}, e.columns("instances"))
	require.Equal(t, phase.Complete, e.phase("L"))
}

// TestShortBrokerLeaseAfterLongInitialLease: an agent with a database
// registers its 10 s InitialLease at start; the broadcaster it then talks
// to runs with --lease 1s. The store's expiry must never fall below the
// agent's own deadline: while the agent considers itself unfenced, the
// runner must still count it live. Both clocks are this machine's; the
// store is read after the agent, and the time between is credited to it.
func TestShortBrokerLeaseAfterLongInitialLease(t *testing.T) {
	t.Parallel()
	e := e2eSetup(t)
	e.startBroadcaster(true, func(cfg *broadcaster.Config) { cfg.LeaseDuration = time.Second })
	cfg := e.agentConfig("nova-api", true)
	cfg.InitialLease = 10 * time.Second
	a := e.startAgent(cfg)
	for range 6 {
		before := time.Now()
		st := a.Stats()
		row, ok := e.agentRow(a.ID())
		between := time.Since(before)
		require.True(t, ok)
		require.False(t, st.Fenced)
		storeLeft := time.Duration(row.LeaseRemainingMS)*time.Millisecond + between
		require.GreaterOrEqual(t, storeLeft+10*time.Millisecond, st.LeaseRemaining,
			"the store's lease (%s left) runs out before the agent's own (%s left): the runner would count it gone while it serves", storeLeft, st.LeaseRemaining)
		time.Sleep(e2eHeartbeat)
	}
}
