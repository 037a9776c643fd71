package amqpx_test

import (
	"testing"

	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/amqpx"
	"github.com/phasecast/phasecast/internal/wire"
)

// Each kind's authentication travels in its own header, and a message
// without one carries no headers at all.
func TestPublishing(t *testing.T) {
	body := []byte(`{"v":1}`)
	for _, tc := range []struct {
		kind   wire.Kind
		header string
	}{
		{wire.KindState, wire.SignatureHeader},
		{wire.KindGrant, wire.SignatureHeader},
		{wire.KindStatus, wire.MACHeader},
	} {
		msg := amqpx.Publishing("phasecast-test", tc.kind, body, "auth")
		require.Equal(t, "application/json", msg.ContentType)
		require.Equal(t, string(tc.kind), msg.Type)
		require.Equal(t, "phasecast-test", msg.AppId)
		require.False(t, msg.Timestamp.IsZero())
		require.Equal(t, body, msg.Body)
		require.Equal(t, amqp.Table{tc.header: "auth"}, msg.Headers, tc.kind)

		require.Nil(t, amqpx.Publishing("phasecast-test", tc.kind, body, "").Headers, tc.kind)
	}
}

func TestURLUserOfAClusterList(t *testing.T) {
	require.Equal(t, "nova", amqpx.URLUser("amqp://nova:pw@h1:5672/, amqp://nova:pw@h2:5672/"))
	require.Equal(t, "guest", amqpx.URLUser("amqp://h1/"))
	require.Equal(t, "", amqpx.URLUser("http://nope/"))
}
