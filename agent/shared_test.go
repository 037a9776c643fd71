package agent

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/faultproxy"
	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/internal/wire"
)

// sharedProxy returns a fault proxy to the test broker, refusing
// connections from the start if refuse, and a shared connection through
// it, closed when the test ends (after the agents started later, whose
// cleanups run first).
func sharedProxy(t *testing.T, refuse bool) (*faultproxy.Proxy, *SharedConnection) {
	t.Helper()
	upstream, err := faultproxy.HostPort(testenv.AMQPURL())
	require.NoError(t, err)
	p := faultproxy.Start(t, upstream)
	// Before the connection exists: its loop dials at once.
	p.Refuse(refuse)
	c, err := NewSharedConnection(p.URL(testenv.AMQPURL()), "phasecast-agent-test shared", zerolog.New(zerolog.NewTestWriter(t)))
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, c.Close()) })
	return p, c
}

// startShared starts n agents on c, concurrently, stopped when the test
// ends.
func startShared(t *testing.T, b *bundle, c *SharedConnection, n int, withDB bool) []*Agent {
	t.Helper()
	agents := make([]*Agent, n)
	for i := range agents {
		cfg := b.config(t, withDB)
		cfg.ID = fmt.Sprintf("shared-%d-%s", i, randomHex(2))
		cfg.Connection = c
		cfg.AMQPURL = "amqp://guest:guest@127.0.0.1:1/" // not used: nothing listens there
		a, err := New(cfg)
		require.NoError(t, err)
		agents[i] = a
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i, a := range agents {
		wg.Go(func() { errs[i] = a.Start(ctx) })
	}
	wg.Wait()
	for _, a := range agents {
		t.Cleanup(func() { stopAgent(t, a) })
	}
	require.NoError(t, errors.Join(errs...))
	return agents
}

// requireAllAcked waits until every agent's acknowledgement of epoch is in
// the store.
func requireAllAcked(t *testing.T, b *bundle, agents []*Agent, epoch int64) {
	t.Helper()
	require.Eventually(t, func() bool {
		rows, err := b.store.Agents(context.Background())
		require.NoError(t, err)
		drained := make(map[string]int64, len(rows))
		for _, r := range rows {
			drained[r.ID] = r.DrainedEpoch
		}
		for _, a := range agents {
			if drained[a.ID()] < epoch {
				return false
			}
		}
		return true
	}, 15*time.Second, 10*time.Millisecond, "not every agent acknowledged epoch %d", epoch)
}

func TestSharedConnection(t *testing.T) {
	t.Parallel()
	for _, withDB := range []bool{false, true} {
		name := map[bool]string{false: "WithoutDB", true: "WithDB"}[withDB]
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			const n = 12
			b := setup(t, fakeOptions{})
			applyRelease(t, b.store, manifestL)
			p, c := sharedProxy(t, false)
			agents := startShared(t, b, c, n, withDB)
			require.Equal(t, 1, p.Conns(), "%d agents share one connection", n)

			// Every agent has a queue of its own and acknowledges a flip.
			queues := map[string]bool{}
			for _, a := range agents {
				s := a.session()
				require.NotNil(t, s)
				queues[s.queue] = true
			}
			require.Len(t, queues, n)
			e := flip(t, b.store, "L", phase.Migrate)
			requireAllAcked(t, b, agents, e)

			// Cut the connection: every agent's session ends, and each
			// reconnects on the next connection, re-syncs and acks again.
			resyncs := make([]int64, n)
			for i, a := range agents {
				resyncs[i] = a.Stats().Resyncs
			}
			p.Cut()
			require.Eventually(t, func() bool {
				for i, a := range agents {
					st := a.Stats()
					if st.Reconnects < 1 || a.session() == nil {
						return false
					}
					if withDB && st.Resyncs <= resyncs[i] {
						return false // a reconnect re-syncs from the store
					}
				}
				return true
			}, 15*time.Second, 10*time.Millisecond, "every agent reconnects (and, with a DB, re-syncs)")
			require.Equal(t, 1, p.Conns(), "still one connection after the reconnect")
			e = flip(t, b.store, "L", phase.Contract)
			requireAllAcked(t, b, agents, e)
			for _, a := range agents {
				require.True(t, a.Snapshot().Removed("instances", "name"))
				require.False(t, a.Stats().Fenced)
			}
		})
	}

	t.Run("StopDeletesQueueOnly", func(t *testing.T) {
		t.Parallel()
		b := setup(t, fakeOptions{})
		applyRelease(t, b.store, manifestL)
		_, c := sharedProxy(t, false)
		agents := startShared(t, b, c, 2, false)
		queue := agents[0].session().queue

		// Stopping one agent closes its channels, so the broker deletes
		// its auto-delete queue; the other agent carries on.
		stopAgent(t, agents[0])
		conn := testenv.AMQP(t)
		require.Eventually(t, func() bool {
			ch, err := conn.Channel()
			require.NoError(t, err)
			_, err = ch.QueueDeclarePassive(queue, false, true, true, false, nil)
			var amqpErr *amqp.Error
			if errors.As(err, &amqpErr) && amqpErr.Code == amqp.NotFound {
				return true
			}
			_ = ch.Close()
			return false
		}, 10*time.Second, 20*time.Millisecond, "queue %s deleted when its agent stopped", queue)
		e := flip(t, b.store, "L", phase.Migrate)
		requireAllAcked(t, b, agents[1:], e)
	})

	t.Run("BrokerUnreachableAtStart", func(t *testing.T) {
		t.Parallel()
		b := setup(t, fakeOptions{})
		epoch := applyRelease(t, b.store, manifestL)
		p, c := sharedProxy(t, true)
		// With a DB, Start returns on the store's lease after the shared
		// connection's first attempt failed, as with a connection of its
		// own; the agents connect once the broker is back.
		agents := startShared(t, b, c, 3, true)
		for _, a := range agents {
			require.Equal(t, epoch, a.Snapshot().Epoch())
			require.Nil(t, a.session())
		}
		p.Refuse(false)
		require.Eventually(t, func() bool {
			for _, a := range agents {
				if a.session() == nil {
					return false
				}
			}
			return true
		}, 20*time.Second, 10*time.Millisecond, "agents connect once the broker is reachable")
		e := flip(t, b.store, "L", phase.Migrate)
		requireAllAcked(t, b, agents, e)
	})
}

// TestSharedConnectionJoins is not parallel: it counts goroutines.
func TestSharedConnectionJoins(t *testing.T) {
	b := setup(t, fakeOptions{})
	applyRelease(t, b.store, manifestL)
	time.Sleep(100 * time.Millisecond)
	base := runtime.NumGoroutine()

	c, err := NewSharedConnection(testenv.AMQPURL(), "phasecast-agent-test joins", zerolog.Nop())
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	var agents []*Agent
	for i := range 3 {
		cfg := b.config(t, i%2 == 0)
		cfg.Connection = c
		a, err := New(cfg)
		require.NoError(t, err)
		require.NoError(t, a.Start(ctx))
		agents = append(agents, a)
	}
	for _, a := range agents {
		require.NoError(t, a.Stop(ctx))
	}
	require.NoError(t, c.Close())
	require.NoError(t, c.Close(), "Close twice")
	requireGoroutines(t, base)

	// An agent started on a closed connection behaves as with an
	// unreachable broker: with a DB it runs on the store.
	cfg := b.config(t, true)
	cfg.Connection = c
	a, err := New(cfg)
	require.NoError(t, err)
	require.NoError(t, a.Start(ctx))
	require.NoError(t, a.Stop(ctx))
	requireGoroutines(t, base)
}

// TestSharedConnectionVerifiesStatesOnce: the shared connection's memory
// of verified states answers as wire.Verify does. A triple that verified passes again; any
// other body, signature or key is verified, and fails as it would, even
// one whose pieces join to a remembered triple's bytes.
func TestSharedConnectionVerifiesStatesOnce(t *testing.T) {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	otherPub, _, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	body := []byte(`{"v":1,"kind":"state","epoch":7,"releases":[]}`)
	sig := wire.Sign(priv, body)

	var c SharedConnection
	require.NoError(t, c.verifyState(pub, body, sig))
	require.NoError(t, c.verifyState(pub, body, sig), "a remembered triple passes")

	for name, tc := range map[string]struct {
		key  ed25519.PublicKey
		body []byte
		sig  string
	}{
		"another body":                  {pub, []byte(`{"v":1,"kind":"state","epoch":8,"releases":[]}`), sig},
		"another key":                   {otherPub, body, sig},
		"no signature":                  {pub, body, ""},
		"the body's head in the header": {pub, body[5:], sig + string(body[:5])},
	} {
		t.Run(name, func(t *testing.T) {
			err := c.verifyState(tc.key, tc.body, tc.sig)
			require.Error(t, err)
			require.Equal(t, wire.Verify(tc.key, tc.body, tc.sig) == nil, err == nil)
		})
	}
	// Still remembered after the failures, and only verified triples are.
	require.NoError(t, c.verifyState(pub, body, sig))
	for _, k := range c.verified.keys {
		if k != "" {
			require.Equal(t, verifiedKey(pub, sig, body), k)
		}
	}
}

// TestSharedConnectionDecodesStatesOnce: agents on a shared connection
// share one decoding of a state's body; another body is decoded anew, and
// a body that does not decode fails each time, remembered for nobody.
func TestSharedConnectionDecodesStatesOnce(t *testing.T) {
	var c SharedConnection
	body := []byte(`{"v":1,"kind":"state","epoch":7,"releases":[{"name":"L","phase":"contract","removals":[{"table":"t","columns":["a"]}]}]}`)
	first, err := c.decodeState(body)
	require.NoError(t, err)
	want, err := wire.DecodeState(body)
	require.NoError(t, err)
	require.Equal(t, want, *first)
	again, err := c.decodeState(append([]byte(nil), body...))
	require.NoError(t, err)
	require.Same(t, first, again, "the same bytes: the same decoding")

	other, err := c.decodeState([]byte(`{"v":1,"kind":"state","epoch":8,"releases":[]}`))
	require.NoError(t, err)
	require.Equal(t, int64(8), other.Epoch)
	for range 2 {
		_, err = c.decodeState([]byte(`{"v":1,"kind":"state","epoch":"9"}`))
		require.Error(t, err)
	}
	for _, k := range c.decoded.keys {
		require.NotContains(t, k, `"9"`)
	}
}
