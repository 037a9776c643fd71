package faults

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/agent"
	"github.com/phasecast/phasecast/broadcaster"
	"github.com/phasecast/phasecast/internal/amqpx"
	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/testenv"
)

// EnvCluster runs the test that starts a RabbitMQ cluster of its own
// (three more nodes on ports 5681-5683): it costs half a minute and three
// Erlang VMs, so it runs alone, as .ci/run runs it.
const EnvCluster = "PHASECAST_RABBIT_CLUSTER"

const (
	// clusterBrokerLoss is the broadcasters' --broker-loss-timeout here:
	// each reaches one node only, so losing it means stepping down.
	// clusterLiveness, their --liveness-interval, is how often the leader
	// looks at its broker links and a standby tries for the lock.
	clusterBrokerLoss = 500 * time.Millisecond
	clusterLiveness   = 100 * time.Millisecond
	// clusterConfirm is the agents' Config.StatusConfirmTimeout: a status
	// sent to the status queue while its quorum elects a new leader may
	// get no confirm until then, and goes through the store after this.
	// The default (2 s) alone would use up the bound below.
	clusterConfirm = 500 * time.Millisecond
	// ackBound is how soon after a node's death every live agent's
	// acknowledgement must be in the store.
	ackBound = 2 * time.Second
	// clusterAgents, spread over the nodes by their shuffled URL lists.
	clusterAgents = 6
)

// TestRabbitClusterNodeLoss: a three-node RabbitMQ cluster, the policies
// of docs/rabbitmq-cluster.md, a leading broadcaster that reaches node 1
// only and a standby that reaches node 2 only, and agents with every node
// in their lists, running guarded traffic. The leader's node is killed
// (SIGKILL of its Erlang VM) and a flip committed at once, before anyone
// could publish it: the leader steps down, the standby leads and publishes,
// and every agent acknowledges within two seconds of the kill. The node
// comes back; then a flip to contract is committed, the runner starts and
// the node with the most agents is killed: every agent acknowledges within
// two seconds again, the runner drops only after all of them did, and no
// query fails.
func TestRabbitClusterNodeLoss(t *testing.T) {
	if os.Getenv(EnvCluster) != "1" {
		t.Skipf("starts a RabbitMQ cluster of its own: run alone, with %s=1 (as .ci/run does)", EnvCluster)
	}
	began := time.Now()
	cluster := testenv.RabbitCluster(t, 3)
	figure(t, "cluster_start", cluster.Started)
	e := setup(t)
	cluster.ApplyDocPolicies(t, "../../docs/rabbitmq-cluster.md", e.prefix)

	leaderID, standbyID := "leader-n1-"+e.prefix, "standby-n2-"+e.prefix
	// A cluster's status queue is a quorum queue, as
	// docs/rabbitmq-cluster.md says to declare it.
	e.startBroadcaster(func(c *broadcaster.Config) {
		c.ID, c.AMQPURL, c.BrokerLossTimeout, c.LivenessInterval = leaderID, cluster.Nodes[0].URL(), clusterBrokerLoss, clusterLiveness
		c.StatusQueueType = amqpx.StatusQueueQuorum
	})
	standbyCfg := e.broadcasterConfig()
	standbyCfg.ID, standbyCfg.AMQPURL, standbyCfg.BrokerLossTimeout, standbyCfg.LivenessInterval = standbyID, cluster.Nodes[1].URL(), clusterBrokerLoss, clusterLiveness
	standbyCfg.StatusQueueType = amqpx.StatusQueueQuorum
	standby, err := broadcaster.New(standbyCfg)
	require.NoError(t, err)
	require.NoError(t, standby.Start(e.ctx))
	t.Cleanup(func() { stopBroadcaster(t, standby) })
	require.False(t, standby.IsLeader())

	agentDB := e.agentDB(clusterAgents)
	svcDB := e.serviceDB("faults-cluster", 2*clusterAgents)
	var cfgs []agent.Config
	for i := range clusterAgents {
		cfg := e.agentConfig(fmt.Sprintf("cluster-%d", i), agentDB)
		cfg.AMQPURL, cfg.StatusConfirmTimeout = cluster.URLs(), clusterConfirm
		cfgs = append(cfgs, cfg)
	}
	agents := e.startAgents(cfgs)
	var trs []*traffic
	for _, a := range agents {
		trs = append(trs, e.runTraffic(a, svcDB, 2))
	}
	current, err := e.store.Epoch(e.ctx)
	require.NoError(t, err)
	e.waitDrained(current, ids(agents)...)
	spread := agentsByNode(t, cluster)
	t.Logf("agents by node: %v", spread)
	figure(t, "agents_by_node_start", fmt.Sprint(spread))

	// Fault 1: the leader's node dies, and a flip commits right after.
	killed := e.dbNow()
	killedLocal := time.Now()
	cluster.Nodes[0].Kill(t)
	epoch := e.flip(phase.Migrate)
	// The node comes back meanwhile (it takes many seconds to boot).
	restarted := time.Now()
	restart := make(chan error, 1)
	go func() { restart <- cluster.Nodes[0].Start() }()
	waitFor(t, wait, "the standby to lead", standby.IsLeader)
	figure(t, "standby_leads_after", time.Since(killedLocal))
	e.waitDrained(epoch, ids(agents)...)
	row, _ := e.broadcasterRow(leaderID)
	require.False(t, row.Leader, "the deaf leader's row does not count it as leading")
	lastAck := latest(e.ackTimes(epoch))
	figure(t, "leader_node_killed_last_ack_after", lastAck.Sub(killed))
	require.LessOrEqual(t, lastAck.Sub(killed), ackBound, "every agent acknowledged the flip within %s of the leader's node's death", ackBound)

	select {
	case err := <-restart:
		require.NoError(t, err)
	case <-time.After(2 * time.Minute):
		t.Fatal("the killed node did not start again within 2 minutes")
	}
	figure(t, "node_restart", time.Since(restarted))
	require.Len(t, cluster.RunningNodes(t), 3, "the restarted node rejoined")

	// Fault 2: a flip to contract, the runner waiting, and the node with
	// the most agents dies, other than the leader's if another has any.
	spread = agentsByNode(t, cluster)
	victim := 1
	for _, n := range []int{0, 2} {
		if len(spread[n]) > 0 && (victim == 1 || len(spread[n]) > len(spread[victim])) {
			victim = n
		}
	}
	figure(t, "agents_by_node_before_second_fault", fmt.Sprint(spread))
	require.NotEmpty(t, spread[victim])
	contractEpoch := e.flip(phase.Contract)
	runner := e.runnerAsync(nil)
	killed = e.dbNow()
	cluster.Nodes[victim].Kill(t)
	r := awaitRunner(t, runner, wait)
	require.Equal(t, contractEpoch, r.res.ContractEpoch)
	lastAck = e.requireDroppedAfterAcks(r, ids(agents))
	figure(t, "agents_node_killed", cluster.Nodes[victim].Name)
	figure(t, "agents_node_killed_last_ack_after", lastAck.Sub(killed))
	require.LessOrEqual(t, lastAck.Sub(killed), ackBound, "every agent acknowledged the contract within %s of its node's death", ackBound)
	queries, _, refused := requireTraffic(t, trs...)
	figure(t, "queries", queries)
	figure(t, "refused", refused)
	var unconfirmed int64
	for _, a := range agents {
		unconfirmed += a.Stats().UnconfirmedStatuses
	}
	figure(t, "unconfirmed_statuses", unconfirmed)
	figure(t, "total", time.Since(began))
}

// agentsByNode maps each node's index to the agents connected to it.
func agentsByNode(t *testing.T, cluster *testenv.Cluster) map[int][]string {
	t.Helper()
	out := map[int][]string{}
	for n, names := range cluster.ConnectionNames(t) {
		for _, name := range names {
			if id, ok := strings.CutPrefix(name, "phasecast-agent "); ok {
				out[n] = append(out[n], id)
			}
		}
	}
	return out
}

// dbNow is the database's clock, which the status log's times are on.
func (e *env) dbNow() time.Time {
	e.t.Helper()
	var now time.Time
	require.NoError(e.t, e.db.GetContext(context.Background(), &now, `SELECT clock_timestamp()`))
	return now
}

// latest is the latest of the times.
func latest(times map[string]time.Time) time.Time {
	var last time.Time
	for _, at := range times {
		if at.After(last) {
			last = at
		}
	}
	return last
}
