package amqpx_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"sync/atomic"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/amqpx"
	"github.com/phasecast/phasecast/internal/faultproxy"
	"github.com/phasecast/phasecast/internal/testenv"
)

// The caller's own first connection is served before the loop dials, and
// every connection is closed once its session is over.
func TestReconnectorServesFirstThenRedials(t *testing.T) {
	first, err := amqpx.Dial(testenv.AMQPURL(), "phasecast test first")
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var served []*amqp.Connection
	r := amqpx.Reconnector{URLs: []string{testenv.AMQPURL()}, Name: "phasecast test redial", Log: testenv.Logger(), First: first}
	err = r.Run(ctx, func(_ context.Context, conn *amqp.Connection) error {
		served = append(served, conn)
		if len(served) == 3 {
			cancel()
			return nil
		}
		return errors.New("session over")
	})
	require.ErrorIs(t, err, context.Canceled)
	require.Len(t, served, 3)
	require.Same(t, first, served[0], "the caller's connection comes first")
	require.NotSame(t, served[0], served[1])
	require.NotSame(t, served[1], served[2])
	for i, conn := range served {
		require.True(t, conn.IsClosed(), "connection %d is closed after its session", i)
	}
}

// A broker that refuses connections is dialled again and again, each
// failure reported and logged once, until it answers; cancelling the
// context then ends the loop.
func TestReconnectorRetriesUntilTheBrokerAnswers(t *testing.T) {
	proxy := faultproxy.Start(t, "127.0.0.1:5672")
	proxy.Refuse(true)
	var failures, logged atomic.Int64
	log := zerolog.New(io.Discard).Hook(zerolog.HookFunc(func(_ *zerolog.Event, level zerolog.Level, _ string) {
		if level == zerolog.WarnLevel {
			logged.Add(1)
		}
	}))
	served := make(chan struct{})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	url := proxy.URL(testenv.AMQPURL())
	r := amqpx.Reconnector{
		URLs:       []string{url},
		Name:       "phasecast test retry",
		Log:        log,
		DialFailed: func(error) { failures.Add(1) },
	}
	done := make(chan error, 1)
	go func() {
		done <- r.Run(ctx, func(ctx context.Context, conn *amqp.Connection) error {
			close(served)
			<-ctx.Done()
			return ctx.Err()
		})
	}()

	require.Eventually(t, func() bool { return failures.Load() >= 3 }, 10*time.Second, 10*time.Millisecond)
	proxy.Refuse(false)
	select {
	case <-served:
	case <-time.After(15 * time.Second):
		t.Fatal("no session after the broker answered again")
	}
	require.Equal(t, failures.Load(), logged.Load(), "one log line per failed attempt")

	cancel()
	select {
	case err := <-done:
		require.ErrorIs(t, err, context.Canceled)
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after its context was cancelled")
	}
}

// A list whose first node refuses connections: the loop moves on to the
// next URL at once, and neither the log nor the dial error shows the
// password of the node that failed.
func TestReconnectorTriesEveryURLAndLogsNoPassword(t *testing.T) {
	var logs bytes.Buffer
	dead := "amqp://guest:dead-s3cret@127.0.0.1:1/"
	var dialErrs []string
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	r := amqpx.Reconnector{
		URLs:       []string{dead, testenv.AMQPURL()},
		Name:       "phasecast test list",
		Log:        zerolog.New(&logs),
		DialFailed: func(err error) { dialErrs = append(dialErrs, err.Error()) },
	}
	sessions := 0
	start := time.Now()
	err := r.Run(ctx, func(_ context.Context, conn *amqp.Connection) error {
		sessions++
		if sessions == 3 {
			cancel()
			return nil
		}
		return errors.New("session over")
	})
	require.ErrorIs(t, err, context.Canceled)
	require.Equal(t, 3, sessions, "each session after a loss is served by the node that answers")
	require.NotEmpty(t, dialErrs, "the dead node was tried")
	require.Less(t, time.Since(start), 5*time.Second, "a refused node costs no backoff while another answers")
	for _, e := range dialErrs {
		require.NotContains(t, e, "dead-s3cret")
		require.Contains(t, e, "guest:xxxxx@127.0.0.1:1")
	}
	require.NotContains(t, logs.String(), "dead-s3cret")
	require.Contains(t, logs.String(), "guest:xxxxx@127.0.0.1:1")

	_, err = amqpx.Dial(dead+",amqp://b:other-s3cret@127.0.0.1:2/", "phasecast test dial")
	require.Error(t, err)
	require.NotContains(t, err.Error(), "s3cret")
	require.Contains(t, err.Error(), "b:xxxxx@127.0.0.1:2")

	_, err = amqpx.ParseURLs(testenv.AMQPURL() + ",http://b:other-s3cret@h2/")
	require.ErrorContains(t, err, "URL 2 of 2")
	require.NotContains(t, err.Error(), "s3cret")
}
