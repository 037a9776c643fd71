package faults

import (
	"context"
	"errors"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/agent"
	"github.com/phasecast/phasecast/broadcaster"
	"github.com/phasecast/phasecast/internal/amqpx"
	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/schema"
)

// TestLeastPrivilege: a broadcaster and agents run end to end with the
// RabbitMQ users and permissions docs/rabbitmq-permissions.md gives, in a
// vhost of the test's own: the agents start, apply both flips and
// acknowledge them, and the runner drops after the last ack. With the
// agents' credentials a forged state cannot even be published.
func TestLeastPrivilege(t *testing.T) {
	t.Parallel()
	e := setup(t)
	lp := testenv.NewLeastPrivilege(t, "../../docs/rabbitmq-permissions.md")
	e.usePrefix(lp.Prefix)
	// The agents' broker user vouches for them, as 'phasecast agents allow
	// SERVICE --amqp-user' lets it.
	require.NoError(t, e.store.AllowPrincipal(e.ctx, schema.AnyService, schema.PrincipalAMQP, lp.Agent, "test"))
	agentURL := lp.URL(t, lp.Agent)
	e.startBroadcaster(func(c *broadcaster.Config) { c.AMQPURL = lp.URL(t, lp.Broadcaster) })
	var cfgs []agent.Config
	for i, db := range []bool{true, false} {
		cfg := e.agentConfig("least-"+string(rune('0'+i)), nil)
		if db {
			cfg.DB = e.agentDB(2)
		}
		cfg.AMQPURL = agentURL
		cfgs = append(cfgs, cfg)
	}
	agents := e.startAgents(cfgs)
	svcDB := e.serviceDB("faults-least", 6)
	var trs []*traffic
	for _, a := range agents {
		trs = append(trs, e.runTraffic(a, svcDB, 2))
	}
	e.waitDrained(e.flip(phase.Migrate), ids(agents)...)
	snaps := []*agent.Snapshot{agents[0].Snapshot(), agents[1].Snapshot()}

	// An agent's credentials: the broker refuses a state before anyone
	// sees it.
	conn, err := amqp.Dial(agentURL)
	require.NoError(t, err)
	defer conn.Close()
	ch, err := conn.Channel()
	require.NoError(t, err)
	require.NoError(t, ch.Confirm(false))
	closed := ch.NotifyClose(make(chan *amqp.Error, 1))
	ctx, cancel := context.WithTimeout(e.ctx, wait)
	defer cancel()
	dc, err := ch.PublishWithDeferredConfirmWithContext(ctx, amqpx.StateExchange(lp.Prefix), "", false, false,
		amqp.Publishing{Body: forgedState(t, 1<<40, phase.Complete, e.table)})
	require.NoError(t, err)
	acked, _ := dc.WaitContext(ctx)
	require.False(t, acked, "the broker confirmed a state published with an agent's credentials")
	select {
	case amqpErr := <-closed:
		var refused *amqp.Error
		require.True(t, errors.As(amqpErr, &refused))
		require.Equal(t, amqp.AccessRefused, refused.Code, refused.Reason)
	case <-time.After(wait):
		t.Fatal("the broker did not refuse the publish")
	}
	for i, a := range agents {
		require.Same(t, snaps[i], a.Snapshot())
		require.Empty(t, a.Stats().RejectedMessages, "nothing forged reached the agents")
	}

	e.flip(phase.Contract)
	r, err := e.contract(e.ctx, e.store, nil)
	e.requireDroppedAfterAcks(runnerResult{res: r, err: err}, ids(agents))
	time.Sleep(300 * time.Millisecond)
	queries, failed, _ := requireTraffic(t, trs...)
	figure(t, "queries", queries)
	figure(t, "queries_failed", failed)
}
