package agent

import (
	"context"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/testenv"
)

// Config.AMQPURL takes a list of a cluster's nodes: a bad entry is named
// by its place, and neither that error nor a failed start shows any of
// the list's passwords, whatever the dial errors say.
func TestAMQPURLListValidatedAndNeverShowsAPassword(t *testing.T) {
	_, err := New(Config{Insecure: true, Service: "svc", AMQPURL: "amqp://a:first-s3cret@127.0.0.1:1/,http://b:second-s3cret@h2/"})
	require.ErrorContains(t, err, "Config.AMQPURL: URL 2 of 2")
	require.NotContains(t, err.Error(), "s3cret")

	logs := &testenv.LogBuffer{}
	a, err := New(Config{
		Insecure: true, Service: "svc", AMQPURL: "amqp://a:first-s3cret@127.0.0.1:1/, amqp://b:second-s3cret@127.0.0.1:2/",
		Logger: zerolog.New(logs),
	})
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	err = a.Start(ctx)
	require.Error(t, err, "no node answers")
	require.NotContains(t, err.Error(), "s3cret")
	require.NotContains(t, logs.String(), "s3cret")
	require.Contains(t, logs.String(), "b:xxxxx@127.0.0.1:2", "the log names the nodes it tried")
}
