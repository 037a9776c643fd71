package integration

import (
	"context"
	"strings"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/amqpx"
	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/internal/wire"
)

// permissionsDoc is the document whose set_permissions lines this test
// applies, so that what it tells operators is what is tested.
const permissionsDoc = "../docs/rabbitmq-permissions.md"

// dialAs connects as user to the test's vhost.
func dialAs(t *testing.T, e *testenv.LeastPrivilege, user string) *amqp.Connection {
	t.Helper()
	conn, err := amqp.Dial(e.URL(t, user))
	require.NoError(t, err, "dial as %s", user)
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

func channel(t *testing.T, conn *amqp.Connection) *amqp.Channel {
	t.Helper()
	ch, err := conn.Channel()
	require.NoError(t, err)
	t.Cleanup(func() { _ = ch.Close() })
	return ch
}

// publishConfirmed publishes msg as mandatory on a confirm-mode channel and
// requires the broker to confirm it and route it to a queue.
func publishConfirmed(t *testing.T, conn *amqp.Connection, exchange, key string, msg amqp.Publishing) {
	t.Helper()
	ch, err := conn.Channel()
	require.NoError(t, err)
	defer ch.Close()
	require.NoError(t, ch.Confirm(false))
	returns := ch.NotifyReturn(make(chan amqp.Return, 1))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	dc, err := ch.PublishWithDeferredConfirmWithContext(ctx, exchange, key, true, false, msg)
	require.NoError(t, err)
	acked, err := dc.WaitContext(ctx)
	require.NoError(t, err)
	require.True(t, acked, "publish to %q with key %q was not confirmed", exchange, key)
	// A mandatory message that reaches no queue is returned before it is
	// confirmed.
	select {
	case r := <-returns:
		t.Fatalf("publish to %q with key %q reached no queue: %s", exchange, key, r.ReplyText)
	default:
	}
}

func receive(t *testing.T, deliveries <-chan amqp.Delivery) amqp.Delivery {
	t.Helper()
	select {
	case d, ok := <-deliveries:
		require.True(t, ok, "consumer closed")
		return d
	case <-time.After(5 * time.Second):
		t.Fatal("no delivery within 5s")
		return amqp.Delivery{}
	}
}

// requireClosedWith runs op on a fresh channel of conn and requires the
// broker to refuse it with code, closing the channel.
func requireClosedWith(t *testing.T, conn *amqp.Connection, code int, op func(ch *amqp.Channel) error) {
	t.Helper()
	ch, err := conn.Channel()
	require.NoError(t, err)
	defer ch.Close()
	closed := ch.NotifyClose(make(chan *amqp.Error, 1))
	if err = op(ch); err == nil {
		// Publishing is asynchronous: the refusal closes the channel later.
		select {
		case amqpErr := <-closed:
			require.NotNil(t, amqpErr, "channel closed without an error")
			err = amqpErr
		case <-time.After(5 * time.Second):
			t.Fatalf("not refused with %d within 5s", code)
		}
	}
	var amqpErr *amqp.Error
	require.ErrorAs(t, err, &amqpErr)
	require.Equal(t, code, amqpErr.Code, amqpErr.Reason)
	t.Log(amqpErr.Reason)
}

func encodeStatus(t *testing.T, agentID string) []byte {
	t.Helper()
	body, err := wire.EncodeStatus(testenv.Credentials(wire.Status{AgentID: agentID, Service: "billing", SentAt: time.Now()}))
	require.NoError(t, err)
	return body
}

func TestPermissions(t *testing.T) {
	e := testenv.NewLeastPrivilege(t, permissionsDoc)
	stateExchange, statusQueue, grantExchange := amqpx.StateExchange(e.Prefix), amqpx.StatusQueue(e.Prefix), amqpx.GrantExchange(e.Prefix)

	// The broadcaster creates the topology, as it does at start.
	bconn := dialAs(t, e, e.Broadcaster)
	bch := channel(t, bconn)
	require.NoError(t, amqpx.DeclareStateExchange(bch, e.Prefix))
	require.NoError(t, amqpx.DeclareStatusQueue(bconn, e.Prefix))
	require.NoError(t, amqpx.DeclareGrantExchange(bch, e.Prefix))
	statuses, err := bch.Consume(statusQueue, "", true, false, false, false, nil)
	require.NoError(t, err)

	// An agent checks the exchange is there, then declares, binds and
	// consumes its own queue.
	aconn := dialAs(t, e, e.Agent)
	ach := channel(t, aconn)
	require.NoError(t, ach.ExchangeDeclarePassive(stateExchange, amqp.ExchangeFanout, true, false, false, false, nil),
		"a passive declare needs no permission")
	q, err := ach.QueueDeclare("", false, true, true, false, nil)
	require.NoError(t, err)
	require.True(t, strings.HasPrefix(q.Name, "amq.gen-"), q.Name)
	require.NoError(t, ach.QueueBind(q.Name, "", stateExchange, false, nil))
	require.NoError(t, ach.ExchangeDeclarePassive(grantExchange, amqp.ExchangeDirect, true, false, false, false, nil))
	require.NoError(t, ach.QueueBind(q.Name, "a1", grantExchange, false, nil), "an agent binds its queue under its ID")
	inbox, err := ach.Consume(q.Name, "", true, true, false, false, nil)
	require.NoError(t, err)
	// Another agent, with the same user, and its own queue.
	oconn := dialAs(t, e, e.Agent)
	och := channel(t, oconn)
	oq, err := och.QueueDeclare("", false, true, true, false, nil)
	require.NoError(t, err)
	require.NoError(t, och.QueueBind(oq.Name, "a2", grantExchange, false, nil))
	otherInbox, err := och.Consume(oq.Name, "", true, true, false, false, nil)
	require.NoError(t, err)

	t.Run("broadcaster publishes states and grants", func(t *testing.T) {
		state, err := wire.EncodeState(wire.State{Epoch: 7})
		require.NoError(t, err)
		publishConfirmed(t, bconn, stateExchange, "", amqp.Publishing{Body: state})
		d := receive(t, inbox)
		require.Equal(t, stateExchange, d.Exchange)
		require.Equal(t, state, d.Body)

		grant, err := wire.EncodeGrant(wire.Grant{AgentID: "a1", Seq: 1, LeaseMS: 1000, Epoch: 7})
		require.NoError(t, err)
		publishConfirmed(t, bconn, grantExchange, "a1", amqp.Publishing{Body: grant})
		d = receive(t, inbox)
		require.Equal(t, grantExchange, d.Exchange)
		require.Equal(t, grant, d.Body)
		select {
		case d := <-otherInbox:
			t.Fatalf("a grant for a1 reached another agent's queue: %s", d.Body)
		case <-time.After(200 * time.Millisecond):
		}
	})

	t.Run("broadcaster cannot publish into a queue by name", func(t *testing.T) {
		// No write on amq.default: whatever a status says, a grant cannot
		// be reflected into another application's queue.
		requireClosedWith(t, bconn, amqp.AccessRefused, func(ch *amqp.Channel) error {
			return ch.PublishWithContext(context.Background(), "", q.Name, false, false, amqp.Publishing{Body: []byte("{}")})
		})
	})

	t.Run("agent publishes statuses with its validated user_id", func(t *testing.T) {
		body := encodeStatus(t, "a1")
		publishConfirmed(t, aconn, "", statusQueue, amqp.Publishing{Body: body, UserId: e.Agent})
		d := receive(t, statuses)
		require.Equal(t, body, d.Body)
		require.Equal(t, e.Agent, d.UserId)
	})

	t.Run("broker refuses a user_id that is not the agent's", func(t *testing.T) {
		requireClosedWith(t, aconn, amqp.PreconditionFailed, func(ch *amqp.Channel) error {
			return ch.PublishWithContext(context.Background(), "", statusQueue, false, false,
				amqp.Publishing{Body: encodeStatus(t, "a1"), UserId: e.Broadcaster})
		})
	})

	t.Run("agent cannot", func(t *testing.T) {
		for _, tc := range []struct {
			name string
			code int
			op   func(ch *amqp.Channel) error
		}{
			{"publish to the state exchange", amqp.AccessRefused, func(ch *amqp.Channel) error {
				require.NoError(t, ch.Confirm(false))
				state, err := wire.EncodeState(wire.State{Epoch: 1 << 40})
				require.NoError(t, err)
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				dc, err := ch.PublishWithDeferredConfirmWithContext(ctx, stateExchange, "", false, false, amqp.Publishing{Body: state})
				require.NoError(t, err)
				acked, err := dc.WaitContext(ctx)
				require.NoError(t, err)
				require.False(t, acked, "the broker confirmed a state published by an agent")
				return nil
			}},
			{"publish a grant", amqp.AccessRefused, func(ch *amqp.Channel) error {
				grant, err := wire.EncodeGrant(wire.Grant{AgentID: "a2", Seq: 1, LeaseMS: 1 << 30, Epoch: 7})
				require.NoError(t, err)
				return ch.PublishWithContext(context.Background(), grantExchange, "a2", false, false, amqp.Publishing{Body: grant})
			}},
			{"declare the state exchange", amqp.AccessRefused, func(ch *amqp.Channel) error {
				return amqpx.DeclareStateExchange(ch, e.Prefix)
			}},
			{"delete the state exchange", amqp.AccessRefused, func(ch *amqp.Channel) error {
				return ch.ExchangeDelete(stateExchange, false, false)
			}},
			{"consume the status queue", amqp.AccessRefused, func(ch *amqp.Channel) error {
				_, err := ch.Consume(statusQueue, "", true, false, false, false, nil)
				return err
			}},
			{"purge the status queue", amqp.AccessRefused, func(ch *amqp.Channel) error {
				_, err := ch.QueuePurge(statusQueue, false)
				return err
			}},
			{"delete the status queue", amqp.AccessRefused, func(ch *amqp.Channel) error {
				_, err := ch.QueueDelete(statusQueue, false, false, false)
				return err
			}},
			{"declare a queue it names", amqp.AccessRefused, func(ch *amqp.Channel) error {
				_, err := ch.QueueDeclare(e.Prefix+".tap", false, true, true, false, nil)
				return err
			}},
			{"declare a queue named like the broker's", amqp.AccessRefused, func(ch *amqp.Channel) error {
				_, err := ch.QueueDeclare("amq.gen-mine", false, true, true, false, nil)
				return err
			}},
			{"declare the grant exchange", amqp.AccessRefused, func(ch *amqp.Channel) error {
				return amqpx.DeclareGrantExchange(ch, e.Prefix)
			}},
			{"bind to another exchange", amqp.AccessRefused, func(ch *amqp.Channel) error {
				return ch.QueueBind(q.Name, "#", "amq.topic", false, nil)
			}},
		} {
			t.Run(tc.name, func(t *testing.T) { requireClosedWith(t, aconn, tc.code, tc.op) })
		}
	})

	t.Run("agent cannot read another agent's queue", func(t *testing.T) {
		other := dialAs(t, e, e.Agent)
		requireClosedWith(t, other, amqp.ResourceLocked, func(ch *amqp.Channel) error {
			_, err := ch.Consume(q.Name, "", true, false, false, false, nil)
			return err
		})
		requireClosedWith(t, other, amqp.ResourceLocked, func(ch *amqp.Channel) error {
			_, err := ch.QueuePurge(q.Name, false)
			return err
		})
	})

	// The state the agent tried to publish reached nobody.
	select {
	case d := <-inbox:
		t.Fatalf("unexpected delivery to the agent: %s", d.Body)
	default:
	}
}
