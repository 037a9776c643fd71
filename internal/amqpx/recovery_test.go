package amqpx_test

import (
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/amqpx"
	"github.com/phasecast/phasecast/internal/faultproxy"
	"github.com/phasecast/phasecast/internal/testenv"
)

// TestBuiltInRecoveryRenamesServerNamedQueues records why phasecast runs
// its own reconnect loop (see doc.go) instead of amqp091-go's built-in
// recovery. Through a cut connection, built-in recovery does bring a
// consumer back, but on a server-named queue with a new name the
// application is never told: grants addressed to the agent's queue by name
// would be dropped until it noticed, and its lease would lapse. Messages
// published during the outage are lost as well, so an agent must re-sync
// after a reconnect either way. If a later amqp091-go keeps the name, this
// test fails, and the choice deserves another look.
func TestBuiltInRecoveryRenamesServerNamedQueues(t *testing.T) {
	proxy := faultproxy.Start(t, "127.0.0.1:5672")
	conn, err := amqp.DialConfig(proxy.URL(testenv.AMQPURL()), amqp.Config{
		Heartbeat: time.Second,
		Recovery: &amqp.Recovery{ReconnectionConfig: &amqp.ReconnectionConfig{
			MaxRetryCount: 50, RetryInterval: 100 * time.Millisecond,
		}},
	})
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close() })
	closed := amqpx.WatchClose(conn)

	prefix := testenv.Prefix(t)
	ch, err := conn.Channel()
	require.NoError(t, err)
	require.NoError(t, amqpx.DeclareStateExchange(ch, prefix))
	q, err := ch.QueueDeclare("", false, true, true, false, nil)
	require.NoError(t, err)
	require.NoError(t, ch.QueueBind(q.Name, "", amqpx.StateExchange(prefix), false, nil))
	deliveries, err := ch.Consume(q.Name, "", true, true, false, false, nil)
	require.NoError(t, err)

	publisher, err := testenv.AMQP(t).Channel()
	require.NoError(t, err)
	publish := func() {
		require.NoError(t, publisher.Publish(amqpx.StateExchange(prefix), "", false, false, amqp.Publishing{Body: []byte("state")}))
	}
	publish()
	<-deliveries

	proxy.Cut()
	select {
	case <-closed:
	case <-time.After(5 * time.Second):
		t.Fatal("no close notification after the cut")
	}
	require.Eventually(t, func() bool {
		publish()
		select {
		case _, ok := <-deliveries:
			return ok
		case <-time.After(100 * time.Millisecond):
			return false
		}
	}, 10*time.Second, time.Millisecond, "built-in recovery brings the consumer back")

	other, err := testenv.AMQP(t).Channel()
	require.NoError(t, err)
	_, err = other.QueueDeclarePassive(q.Name, false, true, true, false, nil)
	var amqpErr *amqp.Error
	require.ErrorAs(t, err, &amqpErr)
	require.Equal(t, amqp.NotFound, amqpErr.Code, "the queue the application knows by name is gone after recovery")
}
