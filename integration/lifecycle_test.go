package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/agent"
	"github.com/phasecast/phasecast/broadcaster"
	"github.com/phasecast/phasecast/examples/novalike"
	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/schema"
)

// Issue "Broadcaster and embedded agent": the real broadcaster and real
// agents, over the real broker and database.

// TestFiftyAgentsAcknowledge: every one of fifty agents acknowledges a
// flip, as recorded in the store.
func TestFiftyAgentsAcknowledge(t *testing.T) {
	e := e2eSetup(t)
	e.createInstances()
	e.apply(e2eReleaseL)
	e.startBroadcaster(true, nil)

	const n = 50
	agents := e.startAgents(n, func(i int) agent.Config {
		cfg := e.agentConfig(fmt.Sprintf("svc-%02d", i%5), true)
		// Fifty agents at the default e2e heartbeat would be 170 statuses
		// a second on two cores under -race; one a second is plenty.
		cfg.HeartbeatInterval = time.Second
		return cfg
	})
	live, err := e.store.LiveAgents(e.ctx)
	require.NoError(t, err)
	require.Len(t, live, n, "every agent registered itself with a lease")

	epoch := e.flip("L", phase.Migrate)
	start := time.Now()
	e.waitDrained(epoch, agents...)
	t.Logf("%d agents acknowledged epoch %d in %s", n, epoch, time.Since(start).Round(time.Millisecond))
	for _, a := range agents {
		require.GreaterOrEqual(t, a.Stats().DrainedEpoch, epoch, a.ID())
	}
}

// TestFlipWhileBroadcasterDown: a flip committed while no broadcaster runs
// reaches agents without a database once one starts.
func TestFlipWhileBroadcasterDown(t *testing.T) {
	t.Parallel()
	e := e2eSetup(t)
	e.createInstances()
	e.apply(e2eReleaseL)
	first := e.startBroadcaster(true, nil)
	agents := e.startAgents(3, func(i int) agent.Config { return e.agentConfig(fmt.Sprintf("nodb-%d", i), false) })
	before := e.epoch()
	for _, a := range agents {
		require.Equal(t, before, a.Snapshot().Epoch())
	}

	e2eStopBroadcaster(t, first)
	epoch := e.flip("L", phase.Migrate)
	rep, err := e.store.Report(e.ctx, 1)
	require.NoError(t, err)
	require.Equal(t, epoch, rep.Unpublished, "with no broadcaster the flip waits in the outbox")
	for _, a := range agents {
		require.Equal(t, before, a.Snapshot().Epoch(), "no broadcaster, no database: nothing tells the agent")
	}

	e.startBroadcaster(true, nil)
	e2eWaitFor(t, e2eWait, "agents to apply the flip", func() bool {
		for _, a := range agents {
			if a.Snapshot().Epoch() < epoch {
				return false
			}
		}
		return true
	})
	e.waitDrained(epoch, agents...)
	unpublished, err := e.store.UnpublishedEpoch(e.ctx)
	require.NoError(t, err)
	require.Zero(t, unpublished)
}

// TestGuardDelaysAck: an open guard on the old snapshot holds the
// acknowledgement back until it exits, and not a moment longer.
func TestGuardDelaysAck(t *testing.T) {
	t.Parallel()
	e := e2eSetup(t)
	e.createInstances()
	e.apply(e2eReleaseL)
	e.startBroadcaster(true, nil)
	a := e.startAgent(e.agentConfig("guarded", true))
	e.toMigrate()

	g, err := a.Enter()
	require.NoError(t, err)
	guardExited := false
	defer func() {
		if !guardExited {
			g.Exit()
		}
	}()
	epoch := e.flipChecked("L")

	// The store hears that the agent applied the flip (every status
	// carries the applied epoch) while its drained epoch stays behind, for
	// as many statuses as we care to watch.
	var seq int64
	e2eWaitFor(t, e2eWait, "the store to record the applied epoch", func() bool {
		row, ok := e.agentRow(a.ID())
		seq = row.Seq
		return ok && row.AppliedEpoch >= epoch
	})
	require.True(t, a.Snapshot().Removed(e.table, "name"), "new work sees the contract")
	require.False(t, g.Snapshot().Removed(e.table, "name"), "the guard keeps the snapshot it pinned")
	e2eWaitFor(t, e2eWait, "three more statuses", func() bool {
		row, _ := e.agentRow(a.ID())
		require.Less(t, row.DrainedEpoch, epoch, "acknowledged with a guard open on the old snapshot")
		require.EqualValues(t, 1, row.Inflight)
		return row.Seq >= seq+3
	})
	require.EqualValues(t, 1, a.Stats().Inflight)
	require.Less(t, a.Stats().DrainedEpoch, epoch)

	g.Exit()
	guardExited = true
	exited := time.Now()
	e2eWaitFor(t, 1500*time.Millisecond, "the acknowledgement after Exit", func() bool { return e.storeDrained(epoch, a) })
	t.Logf("acknowledged %s after Exit", time.Since(exited).Round(time.Millisecond))
}

// TestAgentStartedMidFlip: agents started while flips are committed in
// quick succession end on the newest epoch, with or without a database.
func TestAgentStartedMidFlip(t *testing.T) {
	t.Parallel()
	e := e2eSetup(t)
	e.createInstances()
	e.apply(e2eReleaseL)
	e.startBroadcaster(true, nil)
	e.toMigrate()

	// contract, rollback, contract, ... each one a new epoch; the agents
	// start once the first few are in.
	mid := make(chan struct{})
	var flipErr error
	var flips sync.WaitGroup
	flips.Go(func() {
		defer func() {
			select {
			case <-mid:
			default:
				close(mid)
			}
		}()
		for i := range 8 {
			to := phase.Contract
			if i%2 == 1 {
				to = phase.Migrate
			}
			if _, flipErr = e.store.Flip(e.ctx, "L", to, schema.FlipOptions{Actor: "test"}); flipErr != nil {
				return
			}
			if i == 2 {
				close(mid)
			}
			time.Sleep(50 * time.Millisecond) // pacing, so the flips straddle the agents' start
		}
	})
	<-mid
	withDB := e.startAgent(e.agentConfig("mid-db", true))
	withoutDB := e.startAgent(e.agentConfig("mid-nodb", false))
	flips.Wait()
	require.NoError(t, flipErr)

	final := e.epoch()
	require.Equal(t, phase.Migrate, e.phase("L"))
	e2eWaitFor(t, e2eWait, "both agents to apply the newest epoch", func() bool {
		return withDB.Snapshot().Epoch() == final && withoutDB.Snapshot().Epoch() == final
	})
	e.waitDrained(final, withDB, withoutDB)
	for _, a := range []*agent.Agent{withDB, withoutDB} {
		require.False(t, a.Snapshot().Removed(e.table, "name"), "%s: L is back in migrate", a.ID())
	}
}

// TestStandbyTakesOver: when the leading broadcaster goes, the standby
// leads, and agents keep acknowledging new flips.
func TestStandbyTakesOver(t *testing.T) {
	t.Parallel()
	kills := []struct {
		name string
		kill func(e *e2eEnv, b *broadcaster.Broadcaster)
	}{
		{"StopWithoutGrace", func(e *e2eEnv, b *broadcaster.Broadcaster) {
			ctx, cancel := context.WithCancel(e.ctx)
			cancel()
			_ = b.Stop(ctx) // returns at once; the broadcaster winds down in the background
		}},
		{"TerminateLockConnection", func(e *e2eEnv, b *broadcaster.Broadcaster) {
			var terminated []bool
			require.NoError(e.t, e.db.SelectContext(e.ctx, &terminated, `
				SELECT pg_terminate_backend(pid) FROM pg_locks
				WHERE locktype = 'advisory' AND granted AND objsubid = 1
				  AND ((classid::bigint << 32) | objid::bigint) = hashtext($1)::bigint`,
				"phasecast:"+e.store.Schema()+":leader"))
			require.Equal(e.t, []bool{true}, terminated, "one session holds the leader lock")
		}},
	}
	for _, k := range kills {
		t.Run(k.name, func(t *testing.T) {
			t.Parallel()
			e := e2eSetup(t)
			e.createInstances()
			e.apply(e2eReleaseL)
			leader := e.startBroadcaster(true, nil)
			standby := e.startBroadcaster(false, nil)
			require.False(t, standby.IsLeader())
			agents := []*agent.Agent{e.startAgent(e.agentConfig("db", true)), e.startAgent(e.agentConfig("nodb", false))}
			e.waitDrained(e.toMigrate(), agents...)

			k.kill(e, leader)
			e2eWaitFor(t, e2eWait, "the standby to lead", standby.IsLeader)
			require.EqualValues(t, 1, standby.Stats().Takeovers)

			epoch := e.flipChecked("L")
			e.waitDrained(epoch, agents...)
			for _, a := range agents {
				require.True(t, a.Snapshot().Removed(e.table, "name"), a.ID())
			}
			// The old leader notices at its next liveness round at the
			// latest; until then its relay and its status consumer carry
			// on harmlessly (states are idempotent, statuses seq-ordered).
			e2eWaitFor(t, e2eWait, "the old leader to stand down", func() bool { return !leader.IsLeader() })
		})
	}
}

// TestLeaseExpiresAndAgentFences: when grants stop, an agent without a
// database refuses work once its lease runs out, before the store's copy
// of the lease expires; an agent with a database re-syncs from the store
// and renews its lease there.
func TestLeaseExpiresAndAgentFences(t *testing.T) {
	t.Parallel()
	// Long enough that the lease outlives the broadcaster's Stop on a
	// loaded machine.
	const lease = e2eLease
	e := e2eSetup(t)
	e.createInstances()
	e.apply(e2eReleaseL)
	b := e.startBroadcaster(true, nil)
	noDB := e.startAgent(e.agentConfig("nodb", false))
	// No heartbeats to speak of, so that the re-sync seen below is
	// Enter's own; the store lease it starts with is as short as a grant's.
	dbCfg := e.agentConfig("db", true)
	dbCfg.HeartbeatInterval, dbCfg.InitialLease = time.Minute, lease
	withDB := e.startAgent(dbCfg)
	e.waitDrained(e.toMigrate(), noDB, withDB)

	e2eStopBroadcaster(t, b)
	stopped := time.Now()
	g, err := noDB.Enter()
	require.NoError(t, err, "the lease outlives the broadcaster for a while")
	g.Exit()
	dbRow, ok := e.agentRow(withDB.ID())
	require.True(t, ok)
	resyncsBefore := withDB.Stats().Resyncs

	// Without a database: ErrStale once the lease ran out, and always
	// before the store's copy of the lease expires.
	e2eWaitFor(t, lease+e2eMargin+time.Second, "the agent without a database to fence", func() bool {
		g, err := noDB.Enter()
		if err == nil {
			g.Exit()
			return false
		}
		require.ErrorIs(t, err, agent.ErrStale)
		return true
	})
	t.Logf("fenced %s after the broadcaster stopped", time.Since(stopped).Round(time.Millisecond))
	require.True(t, noDB.Stats().Fenced)
	require.Positive(t, noDB.Stats().StaleRefusals)
	e2eWaitFor(t, lease+time.Second, "the store's lease of the agent without a database to expire", func() bool {
		live, err := e.store.LiveAgents(e.ctx)
		require.NoError(t, err)
		for _, a := range live {
			if a.ID == noDB.ID() {
				return false
			}
		}
		// The runner may now treat the agent as gone: it must have
		// fenced itself already.
		require.True(t, noDB.Stats().Fenced)
		return true
	})

	// With a database: the lease runs out too, and Enter re-syncs.
	e2eWaitFor(t, lease+time.Second, "the agent with a database to fence", func() bool { return withDB.Stats().Fenced })
	g, err = withDB.Enter()
	require.NoError(t, err, "a fenced agent with a database re-syncs on Enter")
	require.False(t, g.Snapshot().Removed(e.table, "name"))
	g.Exit()
	require.Greater(t, withDB.Stats().Resyncs, resyncsBefore)
	require.Zero(t, withDB.Stats().StaleRefusals)
	row, ok := e.agentRow(withDB.ID())
	require.True(t, ok)
	require.True(t, row.LeaseExpiresAt.After(dbRow.LeaseExpiresAt), "the store lease was extended: %s, before %s", row.LeaseExpiresAt, dbRow.LeaseExpiresAt)
	require.True(t, row.Live(), "live in the store without any broadcaster")
}

// TestStatusCommand: 'phasecast status' lists every agent with what it
// acknowledged, in text and as JSON.
func TestStatusCommand(t *testing.T) {
	t.Parallel()
	e := e2eSetup(t)
	e.createInstances()
	e.apply(e2eReleaseL)
	e.startBroadcaster(true, nil)
	acked := e.startAgent(e.agentConfig("svc-acked", true))
	pending := e.startAgent(e.agentConfig("svc-pending", true))
	oldCfg := e.agentConfig("svc-old", true)
	oldCfg.Releases = []string{"K"}
	old := e.startAgent(oldCfg)
	e.toMigrate()

	g, err := pending.Enter()
	require.NoError(t, err)
	defer g.Exit()
	epoch := e.flip("L", phase.Contract) // no checks: svc-old runs old code
	e.waitDrained(epoch, acked, old)
	e2eWaitFor(t, e2eWait, "svc-pending's applied epoch in the store", func() bool {
		row, ok := e.agentRow(pending.ID())
		return ok && row.AppliedEpoch >= epoch
	})

	code, out, errOut := e.cli("status")
	require.Zero(t, code, errOut)
	require.Regexp(t, `AGENT\s+SERVICE\s+HOST/PID\s+APPLIED\s+DRAINED\s+LEASE\s+KNOWS\s+ACKED CONTRACT`, out)
	host, err := os.Hostname()
	require.NoError(t, err)
	want := []struct {
		a              *agent.Agent
		service, knows string
		drained        string
		ack            string
	}{
		{acked, "svc-acked", "L", strconv.FormatInt(epoch, 10), "L:yes"},
		{pending, "svc-pending", "L", "", "L:no"},
		{old, "svc-old", "K", strconv.FormatInt(epoch, 10), "L:old code"},
	}
	for _, w := range want {
		var line string
		for l := range strings.Lines(out) {
			if strings.HasPrefix(l, w.a.ID()+" ") {
				line = l
			}
		}
		require.NotEmpty(t, line, "no row for %s in:\n%s", w.a.ID(), out)
		f := strings.Fields(line)
		require.GreaterOrEqual(t, len(f), 8, line)
		require.Equal(t, w.service, f[1], line)
		require.Equal(t, fmt.Sprintf("%s/%d", host, os.Getpid()), f[2], line)
		require.Equal(t, strconv.FormatInt(epoch, 10), f[3], "applied: %s", line)
		if w.drained != "" {
			require.Equal(t, w.drained, f[4], "drained: %s", line)
		} else {
			d, err := strconv.ParseInt(f[4], 10, 64)
			require.NoError(t, err, line)
			require.Less(t, d, epoch, "drained: %s", line)
		}
		lease, err := time.ParseDuration(f[5])
		require.NoError(t, err, "lease: %s", line)
		require.Positive(t, lease, line)
		require.Equal(t, w.knows, f[6], line)
		require.Equal(t, w.ack, strings.Join(f[7:len(f)-1], " "), line)
		require.True(t, strings.HasPrefix(f[len(f)-1], "db:") || strings.HasPrefix(f[len(f)-1], "amqp:"), "vouched by: %s", line)
	}

	code, out, errOut = e.cli("status", "--json")
	require.Zero(t, code, errOut)
	var rep schema.Report
	require.NoError(t, json.Unmarshal([]byte(out), &rep), out)
	require.Equal(t, e.store.Schema(), rep.Schema)
	require.Equal(t, epoch, rep.Epoch)
	require.Len(t, rep.Releases, 1)
	require.Equal(t, phase.Contract, rep.Releases[0].Phase)
	require.NotNil(t, rep.Releases[0].ContractEpoch)
	require.Equal(t, epoch, *rep.Releases[0].ContractEpoch)
	require.Len(t, rep.Agents, 3)
	byID := map[string]schema.Agent{}
	for _, a := range rep.Agents {
		byID[a.ID] = a
		require.True(t, a.Live(), a.ID)
		require.Equal(t, host, a.Host)
		require.Equal(t, os.Getpid(), a.PID)
	}
	require.Equal(t, "svc-acked", byID[acked.ID()].Service)
	require.GreaterOrEqual(t, byID[acked.ID()].DrainedEpoch, epoch)
	require.Less(t, byID[pending.ID()].DrainedEpoch, epoch)
	require.EqualValues(t, 1, byID[pending.ID()].Inflight)
	oldRow := byID[old.ID()]
	require.False(t, oldRow.Knows("L"))
	require.Equal(t, []string{"K"}, []string(byID[old.ID()].Releases))
	require.NotEmpty(t, rep.Broadcasters)
	require.True(t, rep.Broadcasters[0].Leader)
}

// TestNovalikeBinary: the example service, built and run as its own
// process, follows a flip, stops on SIGTERM and reports one JSON line.
func TestNovalikeBinary(t *testing.T) {
	t.Parallel()
	e := e2eSetup(t)
	e.createInstances()
	e.apply(e2eReleaseL)
	// The binary runs the agent's default heartbeat (2s) and margin (1s).
	e.startBroadcaster(true, func(c *broadcaster.Config) { c.LeaseDuration = 5 * time.Second })

	bin := filepath.Join(t.TempDir(), "novalike")
	buildCtx, cancelBuild := context.WithTimeout(e.ctx, 3*time.Minute)
	defer cancelBuild()
	args := []string{"build", "-o", bin}
	if e2eRaceEnabled() {
		// Built as this test binary was: its packages come from the build
		// cache, and the service runs under the race detector too.
		args = append(args, "-race")
	}
	build := exec.CommandContext(buildCtx, "go", append(args, "./examples/novalike/cmd/novalike")...)
	build.Dir = ".."
	out, err := build.CombinedOutput()
	require.NoError(t, err, "go build: %s", out)

	var stdout, stderr bytes.Buffer
	cmd := exec.Command(bin, "-service", "nova-bin", "-workers", "2", "-table", e.table, "-releases", "L",
		"-database-url", testenv.DatabaseURL(), "-amqp-url", testenv.AMQPURL(),
		"-schema", e.store.Schema(), "-exchange-prefix", e.prefix, "-insecure")
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	require.NoError(t, cmd.Start())
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	exited := false
	t.Cleanup(func() {
		if !exited {
			_ = cmd.Process.Kill()
			<-done
		}
	})
	started := time.Now()

	var id string
	e2eWaitFor(t, 30*time.Second, "the service's agent to register", func() bool {
		agents, err := e.store.LiveAgents(e.ctx)
		require.NoError(t, err)
		for _, a := range agents {
			if a.Service == "nova-bin" {
				id = a.ID
				return true
			}
		}
		return false
	})
	epoch := e.toMigrate()
	e2eWaitFor(t, e2eWait, "the service to acknowledge the flip", func() bool {
		row, ok := e.agentRow(id)
		return ok && row.DrainedEpoch >= epoch
	})
	e2eWaitFor(t, e2eWait, "the service to insert rows", func() bool {
		var n int
		require.NoError(t, e.db.GetContext(e.ctx, &n, e.sql(`SELECT count(*) FROM @app.instances WHERE id > 200`)))
		return n > 0
	})
	if d := 2*time.Second - time.Since(started); d > 0 {
		time.Sleep(d) // run for about two seconds in all
	}

	require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
	select {
	case err := <-done:
		exited = true
		require.NoError(t, err, "exit status; stderr:\n%s", stderr.String())
	case <-time.After(20 * time.Second):
		_ = cmd.Process.Kill()
		<-done
		exited = true
		require.FailNow(t, "no exit 20s after SIGTERM", "stderr:\n%s", stderr.String())
	}
	require.Zero(t, cmd.ProcessState.ExitCode())

	lines := strings.Split(strings.TrimRight(stdout.String(), "\n"), "\n")
	require.Len(t, lines, 1, "stdout: %q", stdout.String())
	var res novalike.Result
	dec := json.NewDecoder(strings.NewReader(lines[0]))
	dec.DisallowUnknownFields()
	require.NoError(t, dec.Decode(&res), lines[0])
	require.Equal(t, "nova-bin", res.Service)
	require.Equal(t, id, res.ID)
	require.Positive(t, res.Queries)
	require.Zero(t, res.Failed, "stderr:\n%s", stderr.String())
	require.Equal(t, epoch, res.Epoch)
	var raw map[string]any
	require.NoError(t, json.Unmarshal([]byte(lines[0]), &raw))
	for _, k := range []string{"service", "queries", "failed", "epoch"} {
		require.Contains(t, raw, k)
	}
}

// e2eRaceEnabled reports whether this test binary was built with -race.
func e2eRaceEnabled() bool {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return false
	}
	for _, s := range bi.Settings {
		if s.Key == "-race" {
			return s.Value == "true"
		}
	}
	return false
}
