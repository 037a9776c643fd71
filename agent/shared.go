package agent

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/rs/zerolog"

	"github.com/phasecast/phasecast/internal/amqpx"
	"github.com/phasecast/phasecast/internal/wire"
)

// ErrConnectionClosed is returned while waiting on a SharedConnection that
// Close has closed.
var ErrConnectionClosed = errors.New("agent: the shared AMQP connection is closed")

// SharedConnection is one AMQP connection that several agents in one
// process use (Config.Connection), each with channels and a queue of its
// own. A real service embeds one agent and keeps the default, a connection
// of its own; sharing is for processes that run many agents, such as the
// benchmark, where a thousand connections would measure the broker's
// connection handling rather than phasecast.
//
// The SharedConnection dials at once and, whenever the connection is lost,
// again with capped exponential backoff and jitter, for as long as it is
// open. When the connection drops, every agent on it sees its session end,
// re-syncs and opens its channels again on the next connection, as it
// would after losing a connection of its own. It watches the connection's
// close and flow-control notifications itself and hands them to the agents,
// so no agent has to drain a notification channel of a connection it does
// not own.
//
// Close it after stopping every agent that uses it. Its methods are safe
// for concurrent use.
type SharedConnection struct {
	log  zerolog.Logger
	user string // the broker user the URL logs in as: agents' statuses name it (user_id)

	mu      sync.Mutex
	cur     *link         // under mu: the live connection, nil while down
	lastErr error         // under mu: why the last attempt failed, nil if it did not
	tried   bool          // under mu: at least one attempt has finished
	changed chan struct{} // under mu: closed and replaced whenever the above change
	closed  bool          // under mu

	cancel context.CancelFunc
	wg     sync.WaitGroup

	// Every agent on the connection receives the same state messages
	// (one publish to the fanout exchange), so the agents verify and
	// decode each once between them: with a thousand agents in one
	// process, verifying the same bytes a thousand times (Ed25519, ~50 µs)
	// took a third of its CPU. verified holds the (public key, signature,
	// body) triples that passed wire.Verify, decoded the states decoded
	// from a body. Grants, which differ per agent, go through neither.
	verified recent[struct{}]
	decoded  recent[*wire.State]
}

// verifyState checks sig over a state's body with key, as wire.Verify
// does: a hit needs the exact key, signature and body of a triple that
// verified; anything else is verified, and remembered if it passes.
func (c *SharedConnection) verifyState(key ed25519.PublicKey, body []byte, sig string) error {
	k := verifiedKey(key, sig, body)
	if _, ok := c.verified.get(k); ok {
		return nil
	}
	if err := wire.Verify(key, body, sig); err != nil {
		return err
	}
	c.verified.put(k, struct{}{})
	return nil
}

// verifiedKey joins a triple so that no other triple joins to the same
// string: the key's and the signature's lengths go first (a signature
// that did not verify may have any length).
func verifiedKey(key ed25519.PublicKey, sig string, body []byte) string {
	return fmt.Sprintf("%d:%d:", len(key), len(sig)) + string(key) + sig + string(body)
}

// decodeState decodes a state's body, as wire.DecodeState does, once for
// every agent on the connection: the agents share the result, which
// nothing changes after decoding (a snapshot copies what it needs).
func (c *SharedConnection) decodeState(body []byte) (*wire.State, error) {
	k := string(body)
	if st, ok := c.decoded.get(k); ok {
		return st, nil
	}
	st, err := wire.DecodeState(body)
	if err != nil {
		return nil, err
	}
	c.decoded.put(k, &st)
	return &st, nil
}

// recent is a small ring of values under exact keys: the last few put.
type recent[V any] struct {
	mu   sync.Mutex
	keys [recentRing]string
	vals [recentRing]V
	next int
}

// recentRing is how many states are remembered: a state and its
// beacons, and a few more, in case flips come fast.
const recentRing = 8

func (r *recent[V]) get(k string) (V, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for i, seen := range r.keys {
		if seen == k {
			return r.vals[i], true
		}
	}
	var zero V
	return zero, false
}

func (r *recent[V]) put(k string, v V) {
	r.mu.Lock()
	r.keys[r.next], r.vals[r.next] = k, v
	r.next = (r.next + 1) % recentRing
	r.mu.Unlock()
}

// link is one live broker connection as an agent's session sees it. For
// an agent's own connection the session watches connClosed and blockedCh
// itself; for a shared connection the SharedConnection does and reports
// through down and blocked.
type link struct {
	conn *amqp.Connection

	connClosed <-chan *amqp.Error   // own connection only
	blockedCh  <-chan amqp.Blocking // own connection only

	down    chan struct{} // shared only: closed when the connection is gone
	downErr error         // shared only: set before down is closed
	shared  bool

	blocked *atomic.Bool // the broker blocked publishing (resource alarm)
}

// ownLink watches a connection the agent dialled itself.
func ownLink(conn *amqp.Connection) *link {
	return &link{
		conn:       conn,
		connClosed: amqpx.WatchClose(conn),
		blockedCh:  conn.NotifyBlocked(make(chan amqp.Blocking, 4)),
		blocked:    new(atomic.Bool),
	}
}

// isDown reports whether a shared link's connection is gone.
func (l *link) isDown() bool {
	if !l.shared {
		return false
	}
	select {
	case <-l.down:
		return true
	default:
		return false
	}
}

// NewSharedConnection returns a connection to the broker at url (one URL,
// or a comma-separated list of a cluster's nodes) for agents
// to share, named name in the broker's management UI, and starts dialling
// it in the background. It fails only on a URL that is not an AMQP URL; an
// unreachable broker is retried, and agents started meanwhile behave as
// with an unreachable broker of their own. log receives one line per lost
// connection and failed attempt; the zero zerolog.Logger writes nothing.
func NewSharedConnection(url, name string, log zerolog.Logger) (*SharedConnection, error) {
	urls, err := amqpx.ParseURLs(url)
	if err != nil {
		return nil, fmt.Errorf("agent: shared connection: %v: give an amqp:// or amqps:// URL, or a comma-separated list of a cluster's nodes", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	c := &SharedConnection{
		log:     log.With().Str("connection", name).Logger(),
		user:    amqpx.URLUser(url),
		changed: make(chan struct{}),
		cancel:  cancel,
	}
	dialer := amqpx.Reconnector{URLs: urls, Name: name, Log: c.log, DialFailed: c.dialFailed}
	c.wg.Go(func() { _ = dialer.Run(ctx, c.serve) })
	return c, nil
}

// Close closes the connection, which ends the session of every agent
// still on it, stops reconnecting and waits for its goroutine to return.
// Agents still running then wait for a connection that never comes. Close
// is safe to call twice.
func (c *SharedConnection) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	c.signalLocked()
	c.mu.Unlock()
	c.cancel()
	c.wg.Wait()
	return nil
}

// signalLocked wakes everyone waiting for a change.
func (c *SharedConnection) signalLocked() {
	close(c.changed)
	c.changed = make(chan struct{})
}

// dialFailed records a failed attempt for await.
func (c *SharedConnection) dialFailed(err error) {
	c.mu.Lock()
	c.lastErr, c.tried = err, true
	c.signalLocked()
	c.mu.Unlock()
}

// serve publishes conn to the agents and relays its notifications until it
// closes or ctx (the SharedConnection's) ends. Both notification channels
// are drained here, for the connection's whole life.
func (c *SharedConnection) serve(ctx context.Context, conn *amqp.Connection) error {
	closes := amqpx.WatchClose(conn)
	blocks := conn.NotifyBlocked(make(chan amqp.Blocking, 4))
	l := &link{conn: conn, down: make(chan struct{}), shared: true, blocked: new(atomic.Bool)}
	c.mu.Lock()
	c.cur, c.lastErr, c.tried = l, nil, true
	c.signalLocked()
	c.mu.Unlock()

	var err error
	for err == nil {
		select {
		case <-ctx.Done():
			err = ErrConnectionClosed
			// Bounded: a broker that stopped answering must not hold up
			// Close.
			_ = amqpx.CloseBounded(conn)
		case e, ok := <-closes:
			if !ok || e == nil {
				err = errors.New("connection closed")
			} else {
				err = e
			}
		case b, ok := <-blocks:
			if !ok {
				err = errors.New("connection closed")
				continue
			}
			l.blocked.Store(b.Active)
			c.log.Warn().Bool("blocked", b.Active).Str("reason", b.Reason).Msg("broker flow control")
		}
	}
	c.mu.Lock()
	c.cur = nil
	l.downErr = err
	close(l.down)
	c.signalLocked()
	c.mu.Unlock()
	// Drain what the library still sends until it closes both channels,
	// so its shutdown never waits on us.
	for range closes {
	}
	for range blocks {
	}
	return err
}

// await returns the live connection, waiting for one until ctx ends. With
// firstAttempt, it returns the error of the last dial instead of waiting
// out the backoff after it: Start's synchronous attempt.
func (c *SharedConnection) await(ctx context.Context, firstAttempt bool) (*link, error) {
	for {
		c.mu.Lock()
		l, lastErr, tried, closed, changed := c.cur, c.lastErr, c.tried, c.closed, c.changed
		c.mu.Unlock()
		switch {
		case closed:
			return nil, ErrConnectionClosed
		case l != nil && !l.isDown():
			return l, nil
		case firstAttempt && tried && lastErr != nil:
			return nil, lastErr
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-changed:
		}
	}
}
