package broadcaster_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/broadcaster"
	"github.com/phasecast/phasecast/internal/amqpx"
	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/internal/wire"
)

// TestReflectedGrantGoesNowhere: a status that names an unrelated queue
// (in its body, as statuses of v1 did, and in reply_to) earns its agent a
// grant on the grant exchange under the agent's recorded ID, and nothing
// at all in the queue it named: the broadcaster cannot be made to inject
// messages into other applications' queues of a shared vhost.
func TestReflectedGrantGoesNowhere(t *testing.T) {
	t.Parallel()
	bundle := setup(t)
	b := start(t, bundle.config(t))
	_, grants := bundle.replyQueue(t)
	// Someone else's queue in the same vhost (an OpenStack service's).
	victim, err := bundle.ch.QueueDeclare("", false, true, true, false, nil)
	require.NoError(t, err)
	victimDeliveries, err := bundle.ch.Consume(victim.Name, "", true, true, false, false, nil)
	require.NoError(t, err)

	st := status("agent-reflector", 1)
	st.StoreID = bundle.storeID(t)
	body, err := wire.EncodeStatus(st)
	require.NoError(t, err)
	// The v1 field, spliced in: the wire no longer has it.
	body = append(body[:len(body)-1], []byte(`,"queue":"`+victim.Name+`"}`)...)
	msg := bundle.publishing(t, body, nil)
	msg.ReplyTo = victim.Name
	require.NoError(t, bundle.ch.PublishWithContext(context.Background(), "", amqpx.StatusQueue(bundle.prefix), false, false, msg))

	g := waitGrant(t, grants, nil, 10*time.Second)
	require.Equal(t, "agent-reflector", g.AgentID, "the agent's own queue gets its grant")
	requireNoDelivery(t, victimDeliveries, 500*time.Millisecond)
	require.Equal(t, int64(1), b.Stats().GrantsSent)
}

// TestStatusWithoutPrincipalEnrolsNothing: a well-formed status with a
// token but no user_id (no broker user vouches for it) creates no row and
// earns no grant; it is counted as unauthenticated.
func TestStatusWithoutPrincipalEnrolsNothing(t *testing.T) {
	t.Parallel()
	bundle := setup(t)
	b := start(t, bundle.config(t))
	_, grants := bundle.replyQueue(t)
	st := status("agent-anonymous", 1)
	st.StoreID = bundle.storeID(t)
	body, err := wire.EncodeStatus(st)
	require.NoError(t, err)
	msg := bundle.publishing(t, body, nil)
	msg.UserId = ""
	require.NoError(t, bundle.ch.PublishWithContext(context.Background(), "", amqpx.StatusQueue(bundle.prefix), false, false, msg))
	require.Eventually(t, func() bool { return b.Stats().Rejected[broadcaster.RejectUnauthenticated] == 1 }, 10*time.Second, 10*time.Millisecond)
	require.Empty(t, bundle.agentIDs(t))
	requireNoDelivery(t, grants, 300*time.Millisecond)
}

// TestOldAgentIsToldWhy: a status of wire v1, from an agent built before
// per-agent tokens, is refused and counted as a version mismatch, with a
// warning that names the agent, its service and host and says to upgrade
// it, rather than dropped in silence.
func TestOldAgentIsToldWhy(t *testing.T) {
	t.Parallel()
	bundle := setup(t)
	logs := &testenv.LogBuffer{}
	cfg := bundle.config(t)
	cfg.Logger = zerolog.New(logs)
	b := start(t, cfg)
	bundle.sendRaw(t, []byte(`{"v":1,"kind":"status","agent_id":"nova-api-7","service":"nova-api","host":"compute-3","seq":1,"queue":"amq.gen-x"}`), nil)
	require.Eventually(t, func() bool { return b.Stats().Rejected[broadcaster.RejectVersion] == 1 }, 10*time.Second, 10*time.Millisecond)
	require.Eventually(t, func() bool { return strings.Contains(logs.String(), `"agent_id":"nova-api-7"`) }, 5*time.Second, 10*time.Millisecond)
	out := logs.String()
	require.Contains(t, out, `"service":"nova-api"`)
	require.Contains(t, out, `"host":"compute-3"`)
	require.Contains(t, out, "status v=1 (this build speaks v=2)")
	require.Contains(t, out, "upgrade the agent")
	require.Empty(t, bundle.agentIDs(t))
}
