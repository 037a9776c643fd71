package agent

import (
	"context"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/amqpx"
	"github.com/phasecast/phasecast/internal/faultproxy"
	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/internal/wire"
)

// A broker that nacks every status (here a status queue that rejects
// each publish, as a quorum queue without a leader may) was not noticed:
// statuses vanished while the agent believed them sent. Now each nack
// drops the connection, and once the queue accepts statuses again the
// new connection's first status carries the agent's state.
func TestNackedStatusReconnectsAndIsSentAgain(t *testing.T) {
	b := setup(t, fakeOptions{})
	cfg := b.config(t, false)
	cfg.StatusConfirmTimeout = 500 * time.Millisecond
	a := startAgent(t, cfg)

	// The status queue now rejects every publish (deleting it also ends
	// the fake broadcaster's consumer).
	ch, err := testenv.AMQP(t).Channel()
	require.NoError(t, err)
	queue := amqpx.StatusQueue(b.prefix)
	_, err = ch.QueueDelete(queue, false, false, false)
	require.NoError(t, err)
	_, err = ch.QueueDeclare(queue, true, false, false, false, amqp.Table{"x-max-length": int32(0), "x-overflow": "reject-publish"})
	require.NoError(t, err)

	require.Eventually(t, func() bool { return a.Stats().Reconnects >= 1 }, 3*time.Second, 10*time.Millisecond,
		"every status was nacked, yet the agent never reconnected: %+v", a.Stats())
	require.GreaterOrEqual(t, a.Stats().UnconfirmedStatuses, int64(1))

	// The queue accepts statuses again: the next one arrives, newer than
	// every status that was nacked.
	lost := a.Stats().Seq
	_, err = ch.QueueDelete(queue, false, false, false)
	require.NoError(t, err)
	_, err = ch.QueueDeclare(queue, true, false, false, false, nil)
	require.NoError(t, err)
	deliveries, err := ch.Consume(queue, "", true, false, false, false, nil)
	require.NoError(t, err)
	select {
	case d := <-deliveries:
		st, err := wire.DecodeStatus(d.Body)
		require.NoError(t, err)
		require.Greater(t, st.Seq, lost, "a status newer than the nacked ones")
		require.Equal(t, a.Stats().DrainedEpoch, st.DrainedEpoch, "it carries the agent's state")
	case <-time.After(10 * time.Second):
		t.Fatal("no status arrived after the queue accepted them again")
	}
}

// A broker that stops answering (a black hole) took statuses into its
// TCP buffers and confirmed nothing, and the agent noticed only when the
// AMQP heartbeat gave up. Now an unconfirmed status drops the connection
// within Config.StatusConfirmTimeout, and after the partition the state
// is sent again.
func TestUnconfirmedStatusTimesOutAndIsSentAgain(t *testing.T) {
	b := setup(t, fakeOptions{})
	proxy := faultproxy.Start(t, "127.0.0.1:5672")
	cfg := b.config(t, false)
	cfg.AMQPURL = proxy.URL(testenv.AMQPURL())
	cfg.StatusConfirmTimeout = 300 * time.Millisecond
	a := startAgent(t, cfg)

	proxy.Blackhole(true)
	cut := time.Now()
	require.Eventually(t, func() bool { return a.Stats().UnconfirmedStatuses >= 1 }, 3*time.Second, 10*time.Millisecond,
		"no status timed out while the broker was silent")
	t.Logf("unconfirmed status noticed %s after the partition", time.Since(cut).Round(time.Millisecond))
	lost := a.Stats().Seq
	from := len(b.fake.received())
	proxy.Blackhole(false)
	st := b.fake.waitStatus(t, from, 15*time.Second, func(st wire.Status) bool { return st.Seq > lost })
	require.Equal(t, a.Stats().DrainedEpoch, st.DrainedEpoch)
	require.GreaterOrEqual(t, a.Stats().Reconnects, int64(1))
}

// With a DB, a status the broker nacks goes through the store at once,
// not with the next heartbeat (here 5 s away) or the next connection
// (refused here).
func TestNackedStatusGoesThroughTheStore(t *testing.T) {
	b := setup(t, fakeOptions{lease: 20 * time.Second})
	proxy := faultproxy.Start(t, "127.0.0.1:5672")
	cfg := b.config(t, true)
	cfg.AMQPURL = proxy.URL(testenv.AMQPURL())
	cfg.HeartbeatInterval, cfg.InitialLease = 5*time.Second, 20*time.Second
	a := startAgent(t, cfg)
	proxy.Refuse(true) // the connection it has stays; a new one is refused
	ch, err := testenv.AMQP(t).Channel()
	require.NoError(t, err)
	queue := amqpx.StatusQueue(b.prefix)
	_, err = ch.QueueDelete(queue, false, false, false)
	require.NoError(t, err)
	_, err = ch.QueueDeclare(queue, true, false, false, false, amqp.Table{"x-max-length": int32(0), "x-overflow": "reject-publish"})
	require.NoError(t, err)

	a.report(context.Background(), "test") // what a drain's ack does
	require.GreaterOrEqual(t, a.Stats().UnconfirmedStatuses, int64(1))
	lost := a.Stats().Seq
	require.Eventually(t, func() bool { return uint64(agentRow(t, b.store, a.ID()).Seq) >= lost }, time.Second, 5*time.Millisecond,
		"the nacked status (seq %d) never reached the store", lost)
}

// A status queue that is gone (RabbitMQ deletes a non-durable classic
// queue whose node is lost) returns the acknowledgement as unroutable:
// the agent drops its connection, and once a broadcaster has declared
// the queue again, the new connection's first status carries the ack.
func TestReturnedAckIsSentAgain(t *testing.T) {
	b := setup(t, fakeOptions{})
	applyRelease(t, b.store, manifestL)
	a := startAgent(t, b.config(t, false))

	ch, err := testenv.AMQP(t).Channel()
	require.NoError(t, err)
	queue := amqpx.StatusQueue(b.prefix)
	_, err = ch.QueueDelete(queue, false, false, false)
	require.NoError(t, err)
	e := flip(t, b.store, "L", phase.Migrate)
	b.fake.publishNow()
	waitEpoch(t, a, e)
	require.Eventually(t, func() bool { return a.Stats().Reconnects >= 1 }, 5*time.Second, 10*time.Millisecond,
		"the ack was returned, yet the agent never reconnected: %+v", a.Stats())

	require.NoError(t, amqpx.DeclareStatusQueue(testenv.AMQP(t), b.prefix))
	back := time.Now()
	deliveries, err := ch.Consume(queue, "", true, false, false, false, nil)
	require.NoError(t, err)
	deadline := time.After(10 * time.Second)
	for {
		select {
		case d := <-deliveries:
			st, err := wire.DecodeStatus(d.Body)
			require.NoError(t, err)
			if st.DrainedEpoch < e {
				continue
			}
			t.Logf("the ack arrived %s after the queue was declared again", time.Since(back).Round(time.Millisecond))
			return
		case <-deadline:
			t.Fatalf("the ack of epoch %d never arrived after the queue was declared again: %+v", e, a.Stats())
		}
	}
}
