package faults

import (
	"context"
	"strings"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/broadcaster"
	"github.com/phasecast/phasecast/internal/amqpx"
	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/internal/wire"
	"github.com/phasecast/phasecast/schema"
)

// TestCompromisedServiceCannotTouchAnotherAgent: the threat table's
// second row, end to end. A compromised service holds its own broker user
// (least privilege, one user per service, allowed to enrol its own
// service's agents only) and its agents' tokens. Against a live agent of
// another service it publishes, with its validated user_id, the attacks
// of the issue: a forged goodbye, a forged acknowledgement, a far-future
// seq, a rival incarnation (a conflict would hold the ID back) and a ghost
// of the victim's service. None changes anything, and the runner still
// waits for the victim.
func TestCompromisedServiceCannotTouchAnotherAgent(t *testing.T) {
	t.Parallel()
	e := setup(t)
	lp := testenv.NewLeastPrivilege(t, "../../docs/rabbitmq-permissions.md")
	e.usePrefix(lp.Prefix)
	attackerUser := lp.AddAgentUser(t, "glance")
	victimCfg := e.agentConfig("victim-0", nil)
	require.NoError(t, e.store.AllowPrincipal(e.ctx, victimCfg.Service, schema.PrincipalAMQP, lp.Agent, "test"))
	require.NoError(t, e.store.AllowPrincipal(e.ctx, "glance", schema.PrincipalAMQP, attackerUser, "test"))
	b := e.startBroadcaster(func(c *broadcaster.Config) { c.AMQPURL = lp.URL(t, lp.Broadcaster) })
	victimCfg.AMQPURL = lp.URL(t, lp.Agent)
	victim := e.startAgent(victimCfg)
	e.waitDrained(e.flip(phase.Migrate), victim.ID())
	g, err := victim.Enter() // a unit of work on the old snapshot: no real ack
	require.NoError(t, err)
	defer g.Exit()
	contract := e.flip(phase.Contract)
	before, err := e.store.Agents(e.ctx)
	require.NoError(t, err)
	require.Len(t, before, 1)

	conn, err := amqp.Dial(lp.URL(t, attackerUser))
	require.NoError(t, err)
	defer conn.Close()
	ch, err := conn.Channel()
	require.NoError(t, err)
	require.NoError(t, ch.Confirm(false))
	storeID, err := e.store.ID(e.ctx)
	require.NoError(t, err)
	send := func(st wire.Status) {
		t.Helper()
		st.StoreID, st.SentAt, st.Host, st.PID, st.Releases = storeID, time.Now(), "attacker", 666, []string{"L"}
		if st.Token == "" {
			st.Token = strings.Repeat("a5", wire.TokenSize) // the attacker's own agents' kind of token
		}
		body, err := wire.EncodeStatus(st)
		require.NoError(t, err)
		ctx, cancel := context.WithTimeout(e.ctx, wait)
		defer cancel()
		dc, err := ch.PublishWithDeferredConfirmWithContext(ctx, "", amqpx.StatusQueue(lp.Prefix), false, false,
			amqp.Publishing{Body: body, UserId: attackerUser})
		require.NoError(t, err)
		ok, err := dc.WaitContext(ctx)
		require.NoError(t, err)
		require.True(t, ok)
	}
	inc := before[0].Incarnation
	send(wire.Status{AgentID: victim.ID(), Incarnation: inc, Service: victimCfg.Service, Seq: uint64(before[0].Seq) + 1, Leaving: true})
	send(wire.Status{AgentID: victim.ID(), Incarnation: inc, Service: victimCfg.Service, Seq: uint64(before[0].Seq) + 2,
		AppliedEpoch: contract, DrainedEpoch: contract})
	send(wire.Status{AgentID: victim.ID(), Incarnation: inc, Service: victimCfg.Service, Seq: uint64(time.Now().UnixNano()) << 1})
	send(wire.Status{AgentID: victim.ID(), Incarnation: "rival", Service: victimCfg.Service, Seq: 1, AppliedEpoch: contract, DrainedEpoch: contract})
	send(wire.Status{AgentID: victim.ID(), Incarnation: "rival-as-glance", Service: "glance", Seq: 1})
	send(wire.Status{AgentID: "victim-ghost", Incarnation: "ghost", Service: victimCfg.Service, Seq: 1, AppliedEpoch: contract, DrainedEpoch: contract})
	// The attacker's own agent, which it may enrol, comes after them in
	// the queue: once it is recorded, they have all been handled.
	send(wire.Status{AgentID: "glance-1", Incarnation: "own", Service: "glance", Seq: 1})
	waitFor(t, wait, "the attacker's own agent to be recorded", func() bool { return e.registered("glance-1") })
	// The refusals are counted. How many depends on how the broker's
	// deliveries fell into batches: within one batch an agent process's
	// statuses count once, and a loaded machine packs them tighter. What
	// the attack changed is checked on the rows below.
	require.Positive(t, b.Stats().Rejected[broadcaster.RejectUnauthenticated])
	found, err := e.store.ForgetAgent(e.ctx, "glance-1", "test")
	require.NoError(t, err)
	require.True(t, found)

	after, err := e.store.Agents(e.ctx)
	require.NoError(t, err)
	require.Len(t, after, 1, "a ghost registered")
	a := after[0]
	require.Equal(t, before[0].Incarnation, a.Incarnation)
	require.Equal(t, before[0].PID, a.PID, "the victim's row took the attacker's status")
	require.Equal(t, "amqp:"+lp.Agent, a.VouchedBy)
	require.True(t, a.Live(), "the forged goodbye ended the victim's lease")
	require.Less(t, a.DrainedEpoch, contract, "the forged acknowledgement was recorded")
	require.Less(t, a.Seq, before[0].Seq+1_000_000, "the far-future seq was recorded")
	require.Empty(t, a.Rivals, "another service's principal held the ID back with a conflict")
	require.Zero(t, b.Stats().Rejected[broadcaster.RejectIDConflict])

	r, err := e.contract(e.ctx, e.store, func(o *schema.ContractOptions) { o.Timeout = 2 * time.Second })
	require.Error(t, err)
	require.Equal(t, schema.OutcomeTimeout, r.Outcome, "the runner waits for the victim")
	require.Positive(t, victim.Stats().Inflight)
}
