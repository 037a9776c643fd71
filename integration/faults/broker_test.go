package faults

import (
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/agent"
	"github.com/phasecast/phasecast/broadcaster"
	"github.com/phasecast/phasecast/cmd/phasecast/fleet"
	"github.com/phasecast/phasecast/internal/amqpx"
	"github.com/phasecast/phasecast/internal/faultproxy"
	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/testenv"
)

// envSerial enables the tests that restart the shared broker.
const envSerial = "PHASECAST_FAULTS_SERIAL"

// serialOnly skips a test that restarts the shared broker unless the
// serial step of .ci/run runs it; anywhere else it would break every
// other test that talks to the broker.
func serialOnly(t *testing.T) {
	t.Helper()
	if os.Getenv(envSerial) != "1" {
		t.Skipf("restarts the shared RabbitMQ: run by .ci/run's serial step (%s=1 go test -run Serial ./integration/faults/)", envSerial)
	}
}

// fleetOf is six agents with a database and two without, each with two
// workers, all dialling amqpURL.
func (e *env) fleetOf(name, amqpURL string, mod func(*agent.Config)) ([]*agent.Agent, []*traffic) {
	e.t.Helper()
	agentDB := e.agentDB(4)
	svcDB := e.serviceDB("faults-"+name, 6)
	var cfgs []agent.Config
	for i := range 8 {
		db := agentDB
		if i >= 6 {
			db = nil
		}
		cfg := e.agentConfig(fmt.Sprintf("%s-%d", name, i), db)
		cfg.AMQPURL = amqpURL
		if mod != nil {
			mod(&cfg)
		}
		cfgs = append(cfgs, cfg)
	}
	agents := e.startAgents(cfgs)
	var trs []*traffic
	for _, a := range agents {
		trs = append(trs, e.runTraffic(a, svcDB, 2))
	}
	return agents, trs
}

// TestBrokerCutMidFlip: the broadcaster and eight agents reach RabbitMQ
// through a proxy. The contract flip commits while the proxy holds every
// byte (the broadcaster's publish and its confirm are in flight), then
// every connection is cut, twice. Every agent converges and acknowledges,
// no acknowledgement is lost, the runner drops only after the last one, and
// no query fails.
func TestBrokerCutMidFlip(t *testing.T) {
	t.Parallel()
	e := setup(t)
	upstream, err := faultproxy.HostPort(testenv.AMQPURL())
	require.NoError(t, err)
	p := faultproxy.Start(t, upstream)
	viaProxy := p.URL(testenv.AMQPURL())
	b := e.startBroadcaster(func(c *broadcaster.Config) { c.AMQPURL = viaProxy })
	agents, trs := e.fleetOf("cut", viaProxy, nil)
	e.waitDrained(e.flip(phase.Migrate), ids(agents)...)

	p.Blackhole(true)
	epoch := e.flip(phase.Contract)
	runner := e.runnerAsync(nil)
	time.Sleep(300 * time.Millisecond)
	unpublished, err := e.store.UnpublishedEpoch(e.ctx)
	require.NoError(t, err)
	require.Equal(t, epoch, unpublished, "the contract state must still be in flight when the connections are cut")
	for _, a := range agents {
		require.Less(t, a.Stats().AppliedEpoch, epoch, "agent %s heard of the flip through the black hole", a.ID())
	}
	cut := time.Now()
	p.Cut()
	p.Blackhole(false)
	time.Sleep(400 * time.Millisecond)
	p.Cut() // and again, while everyone reconnects

	r := awaitRunner(t, runner, 2*wait)
	lastAck := e.requireDroppedAfterAcks(r, ids(agents))
	time.Sleep(300 * time.Millisecond) // traffic after the drop must succeed too
	queries, failed, refused := requireTraffic(t, trs...)
	var reconnects int64
	for _, a := range agents {
		st := a.Stats()
		require.GreaterOrEqual(t, st.DrainedEpoch, epoch, a.ID())
		require.Positive(t, st.Reconnects, "agent %s did not notice the cut", a.ID())
		reconnects += st.Reconnects
	}
	require.Zero(t, mustUnpublished(t, e))
	figure(t, "agents", len(agents))
	figure(t, "converge_after_cut", lastAck.Sub(cut))
	figure(t, "runner_waited", r.res.Waited)
	figure(t, "acks_lost", 0)
	figure(t, "queries", queries)
	figure(t, "queries_failed", failed)
	figure(t, "refused", refused)
	figure(t, "reconnects", reconnects)
	figure(t, "states_published", b.Stats().StatesPublished)
}

func mustUnpublished(t *testing.T, e *env) int64 {
	t.Helper()
	n, err := e.store.UnpublishedEpoch(e.ctx)
	require.NoError(t, err)
	return n
}

// TestSerialBrokerRestart: RabbitMQ itself stops (rabbitmqctl stop_app)
// with a flip to contract committed during the outage, and starts again.
// Agents with a database learn of the flip and acknowledge through the
// store; agents without one can only hear of it from the broker, so the
// runner waits for them until the broker is back. Nothing is lost and no
// query fails. The status queue, a non-durable classic queue by default,
// goes with the restart and the broadcaster declares it again.
func TestSerialBrokerRestart(t *testing.T) {
	serialOnly(t)
	e := setup(t)
	// The prefix's cleanup holds a connection the restart closes: delete
	// the queue and exchange on a fresh one, after everything stopped.
	t.Cleanup((&fleet.Env{AMQPURL: testenv.AMQPURL(), Prefix: e.prefix}).DeleteAMQP)
	// Leases outlast the outage, so that agents without a database stay
	// live in the store and the runner waits for them.
	const longLease = 30 * time.Second
	e.startBroadcaster(func(c *broadcaster.Config) { c.LeaseDuration = longLease })
	agents, trs := e.fleetOf("restart", testenv.AMQPURL(), func(c *agent.Config) { c.LeaseMargin = time.Second })
	e.waitDrained(e.flip(phase.Migrate), ids(agents)...)

	stopped := time.Now()
	testenv.Rabbitmqctl(t, time.Minute, "", "stop_app")
	t.Cleanup(func() { startBroker(t) }) // whatever happens below
	stopTook := time.Since(stopped)
	epoch := e.flip(phase.Contract)
	time.Sleep(time.Second)
	startBroker(t)
	up := time.Now()
	// A leader that reaches no broker is not counted alive (it cannot tell
	// the agents), so a runner started during the outage would refuse:
	// start it once the broadcaster publishes again.
	require.Eventually(t, func() bool {
		ok, err := e.store.LeaderAliveWithin(e.ctx, 10*time.Second)
		return err == nil && ok
	}, time.Minute, 50*time.Millisecond, "the broadcaster leads and publishes again after the restart")
	runner := e.runnerAsync(nil)

	r := awaitRunner(t, runner, 2*longLease)
	lastAck := e.requireDroppedAfterAcks(r, ids(agents))
	acks := e.ackTimes(epoch)
	for _, a := range agents[6:] {
		// Without a database the broker is the only way to hear of a flip.
		require.True(t, acks[a.ID()].After(stopped), a.ID())
	}
	time.Sleep(300 * time.Millisecond)
	queries, failed, refused := requireTraffic(t, trs...)

	out := testenv.Rabbitmqctl(t, time.Minute, "", "list_queues", "-q", "name", "type", "durable")
	var found bool
	for line := range strings.Lines(out) {
		f := strings.Fields(line)
		if len(f) == 3 && f[0] == amqpx.StatusQueue(e.prefix) {
			found = true
			require.Equal(t, amqpx.StatusQueueClassic, f[1], line)
			require.Equal(t, "false", f[2], line)
		}
	}
	require.True(t, found, "the status queue %s was not declared again after the restart:\n%s", amqpx.StatusQueue(e.prefix), out)
	figure(t, "agents", len(agents))
	figure(t, "outage", up.Sub(stopped))
	figure(t, "stop_app", stopTook)
	figure(t, "converge_after_broker_up", lastAck.Sub(up))
	figure(t, "runner_waited", r.res.Waited)
	figure(t, "acks_lost", 0)
	figure(t, "queries", queries)
	figure(t, "queries_failed", failed)
	figure(t, "refused", refused)
}

// startBroker starts the RabbitMQ application and waits until it accepts
// logins. Starting a running one is harmless.
func startBroker(t *testing.T) {
	t.Helper()
	testenv.Rabbitmqctl(t, time.Minute, "", "start_app")
	testenv.Rabbitmqctl(t, 2*time.Minute, "", "await_startup")
}
