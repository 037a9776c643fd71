package agent

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/amqpx"
	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/internal/wire"
)

// BenchmarkStatusPublish is the cost of one status on the real broker's
// quorum status queue: published as before (fire and forget) and as now,
// waiting for the broker's confirm (publishStatus, awaitConfirm). A consumer drains
// the queue meanwhile, as the broadcaster does.
func BenchmarkStatusPublish(b *testing.B) {
	prefix := testenv.Prefix(b)
	conn := testenv.AMQP(b)
	require.NoError(b, amqpx.DeclareStatusQueue(conn, prefix))
	drain, err := conn.Channel()
	require.NoError(b, err)
	deliveries, err := drain.Consume(amqpx.StatusQueue(prefix), "", true, false, false, false, nil)
	require.NoError(b, err)
	go func() {
		for range deliveries {
		}
	}()
	st := wire.Status{V: wire.Version, Kind: wire.KindStatus, AgentID: "bench", Service: "bench", Host: "h", PID: 1, Releases: []string{"L"}, Seq: 1, SentAt: time.Now().UTC()}
	body, err := wire.EncodeStatus(st)
	require.NoError(b, err)
	msg := amqpx.Publishing("phasecast-agent", wire.KindStatus, body, "")
	ctx := context.Background()
	queue := amqpx.StatusQueue(prefix)

	b.Run("unconfirmed", func(b *testing.B) {
		ch, err := conn.Channel()
		require.NoError(b, err)
		defer ch.Close()
		for b.Loop() {
			require.NoError(b, ch.PublishWithContext(ctx, "", queue, false, false, msg))
		}
	})
	b.Run("confirmed", func(b *testing.B) {
		ch, err := conn.Channel()
		require.NoError(b, err)
		defer ch.Close()
		require.NoError(b, ch.Confirm(false))
		sess := newSession(ch, "", nil, nil)
		a := &Agent{cfg: Config{ExchangePrefix: prefix, StatusConfirmTimeout: DefaultStatusConfirmTimeout}}
		for b.Loop() {
			require.True(b, a.awaitConfirm(ctx, a.publishStatus(ctx, sess, msg, st, "bench")))
		}
	})
	_ = drain.Close()
}
