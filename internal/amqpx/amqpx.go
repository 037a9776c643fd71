package amqpx

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/rs/zerolog"

	"github.com/phasecast/phasecast/internal/config"
	"github.com/phasecast/phasecast/internal/retry"
	"github.com/phasecast/phasecast/internal/wire"
)

// StateExchange is the fanout exchange that carries state to every agent.
func StateExchange(prefix string) string { return prefix + ".state" }

// GrantExchange is the direct exchange that carries grants: each agent
// binds its own queue with its agent ID as the routing key, and the
// broadcaster publishes a grant with the ID the store recorded as the key,
// so a grant reaches the agent it is for and no other queue, whatever a
// status says.
func GrantExchange(prefix string) string { return prefix + ".grant" }

// DeclareGrantExchange declares the durable direct grant exchange.
func DeclareGrantExchange(ch *amqp.Channel, prefix string) error {
	return ch.ExchangeDeclare(GrantExchange(prefix), amqp.ExchangeDirect, true, false, false, false, nil)
}

// URLUser is the user an AMQP URL, or the first of a cluster's list of
// them (config.SplitURLs), logs in as ("guest" when it names none), or ""
// when none parses. RabbitMQ checks a message's user_id property against
// the connection's user, so an agent that sets user_id to it proves which
// broker user sent its statuses. A cluster's users are cluster-wide: the
// nodes of one list name the same user.
func URLUser(urls string) string {
	for _, url := range config.SplitURLs(urls) {
		if u, err := amqp.ParseURI(url); err == nil {
			return u.Username
		}
	}
	return ""
}

// StatusQueue is the durable queue that carries agent status to the
// broadcaster.
func StatusQueue(prefix string) string { return prefix + ".status" }

// DeclareStateExchange declares the durable fanout state exchange.
func DeclareStateExchange(ch *amqp.Channel, prefix string) error {
	return ch.ExchangeDeclare(StateExchange(prefix), amqp.ExchangeFanout, true, false, false, false, nil)
}

// EnsureStateExchange makes sure the state exchange exists, for an agent.
// An agent run with least privilege (docs/rabbitmq-permissions.md) may not
// configure the exchange; for it a passive declare checks that the
// broadcaster has declared it. Each attempt uses a scratch channel, since a
// refusal closes the channel it happens on.
func EnsureStateExchange(conn *amqp.Connection, prefix string) error {
	return ensureExchange(conn, StateExchange(prefix), amqp.ExchangeFanout)
}

// EnsureGrantExchange makes sure the grant exchange exists, for an agent,
// as EnsureStateExchange does the state exchange.
func EnsureGrantExchange(conn *amqp.Connection, prefix string) error {
	return ensureExchange(conn, GrantExchange(prefix), amqp.ExchangeDirect)
}

func ensureExchange(conn *amqp.Connection, name, kind string) error {
	ch, err := conn.Channel()
	if err != nil {
		return err
	}
	err = ch.ExchangeDeclare(name, kind, true, false, false, false, nil)
	if err == nil {
		return ch.Close()
	}
	var amqpErr *amqp.Error
	if !errors.As(err, &amqpErr) || amqpErr.Code != amqp.AccessRefused {
		return err
	}
	if ch, err = conn.Channel(); err != nil {
		return err
	}
	defer ch.Close()
	return ch.ExchangeDeclarePassive(name, kind, true, false, false, false, nil)
}

// DeleteTopology deletes the status queue and the state exchange of
// prefix, plus any further queues and exchanges named, ignoring what is
// already gone: the clean-up of demos, benchmarks and tests.
func DeleteTopology(ch *amqp.Channel, prefix string, queues, exchanges []string) {
	for _, q := range append([]string{StatusQueue(prefix)}, queues...) {
		_, _ = ch.QueueDelete(q, false, false, false)
	}
	for _, x := range append([]string{StateExchange(prefix), GrantExchange(prefix)}, exchanges...) {
		_ = ch.ExchangeDelete(x, false, false)
	}
}

// The status queue's types, for DeclareStatusQueueAs.
const (
	// StatusQueueClassic is a non-durable classic queue, the default:
	// measured the fastest layout (BENCHMARKS.md, "The status queue").
	// Nothing in it needs to outlive the broker: a status is superseded by
	// the agent's next one (statuses are cumulative), a lost one is sent
	// again by the next heartbeat, and every agent sends a fresh status
	// on each new connection. On a cluster, RabbitMQ deletes a
	// non-durable queue whose node is lost and the next broadcaster
	// session declares it again on its own node.
	StatusQueueClassic = "classic"
	// StatusQueueQuorum is a durable quorum queue, replicated over a
	// cluster's nodes (a broker without quorum queues gets a classic
	// durable one): what phasecast declared before, and still the choice
	// for a cluster whose operators want the queue to outlive any one
	// node (docs/rabbitmq-cluster.md).
	StatusQueueQuorum = "quorum"
)

// DeclareStatusQueue declares the status queue with the default type,
// StatusQueueClassic (or finds it declared otherwise: see
// DeclareStatusQueueAs).
func DeclareStatusQueue(conn *amqp.Connection, prefix string) error {
	_, err := DeclareStatusQueueAs(conn, prefix, StatusQueueClassic)
	return err
}

// DeclareStatusQueueAs declares the status queue as a queue of type kind
// (StatusQueueClassic or StatusQueueQuorum). A queue already declared
// with other arguments (a quorum queue from an earlier release, one an
// operator declared beforehand) is an operator's decision, not ours to
// change: the broker refuses the declaration (PRECONDITION_FAILED), and
// the queue is used as it is, which kept reports. A broker without
// quorum queues refuses kind quorum and closes the channel, so the
// fallback to a classic durable queue opens a new one.
func DeclareStatusQueueAs(conn *amqp.Connection, prefix, kind string) (kept bool, err error) {
	name := StatusQueue(prefix)
	ch, err := conn.Channel()
	if err != nil {
		return false, err
	}
	durable, args := false, amqp.Table{amqp.QueueTypeArg: amqp.QueueTypeClassic}
	switch kind {
	case StatusQueueClassic:
	case StatusQueueQuorum:
		durable, args = true, amqp.Table{amqp.QueueTypeArg: amqp.QueueTypeQuorum}
	default:
		_ = ch.Close()
		return false, fmt.Errorf("status queue type %q: give %q or %q", kind, StatusQueueClassic, StatusQueueQuorum)
	}
	_, err = ch.QueueDeclare(name, durable, false, false, false, args)
	if err == nil {
		return false, ch.Close()
	}
	var amqpErr *amqp.Error
	if !errors.As(err, &amqpErr) {
		return false, err
	}
	// The channel is closed by the refusal: a new one for what follows.
	if ch, err = conn.Channel(); err != nil {
		return false, err
	}
	defer ch.Close()
	if amqpErr.Code == amqp.PreconditionFailed {
		if _, err := ch.QueueDeclarePassive(name, false, false, false, false, nil); err != nil {
			return false, fmt.Errorf("queue %s exists with other arguments (%v), and a passive declaration failed: %w", name, amqpErr, err)
		}
		return true, nil
	}
	if kind != StatusQueueQuorum {
		return false, err
	}
	_, err = ch.QueueDeclare(name, true, false, false, false, nil)
	return false, err
}

// Publishing wraps a message body as phasecast sends it: JSON, typed by
// its kind in the type property (an agent dispatches on it without
// parsing the body twice), stamped, marked with the sender's app id, and
// with auth, when not empty, in the header its kind is authenticated in
// (a status's MAC, a state's or a grant's signature).
func Publishing(appID string, kind wire.Kind, body []byte, auth string) amqp.Publishing {
	msg := amqp.Publishing{
		ContentType: "application/json",
		Type:        string(kind),
		AppId:       appID,
		Timestamp:   time.Now(),
		Body:        body,
	}
	if auth != "" {
		header := wire.SignatureHeader
		if kind == wire.KindStatus {
			header = wire.MACHeader
		}
		msg.Headers = amqp.Table{header: auth}
	}
	return msg
}

// ParseURLs splits urls, one AMQP URL or a comma-separated list of a
// cluster's nodes, and checks each. An error names the entry at fault and
// never shows a password.
func ParseURLs(urls string) ([]string, error) {
	list := config.SplitURLs(urls)
	if len(list) == 0 {
		return nil, errors.New("no URL given")
	}
	for i, url := range list {
		if _, err := amqp.ParseURI(url); err != nil {
			where := config.Redact(url)
			if len(list) > 1 {
				where = fmt.Sprintf("URL %d of %d (%s)", i+1, len(list), where)
			}
			return nil, fmt.Errorf("%s: %w", where, config.RedactError(err, url))
		}
	}
	return list, nil
}

// DialTimeout bounds the TCP connect and the AMQP handshake of Dial.
const DialTimeout = 5 * time.Second

// Dial connects to the broker at urls, one URL or a comma-separated list
// of a cluster's nodes (config.SplitURLs), trying them in a shuffled
// order until one answers. The connection has a name that shows in the
// broker's management UI, and a short heartbeat so a dead peer is noticed
// in seconds. Its error names every URL tried, without a password.
func Dial(urls, name string) (*amqp.Connection, error) {
	list := Shuffled(config.SplitURLs(urls))
	if len(list) == 0 {
		return nil, errors.New("dial: no AMQP URL given")
	}
	var errs []error
	for _, url := range list {
		conn, err := dialOne(url, name)
		if err == nil {
			return conn, nil
		}
		errs = append(errs, err)
	}
	return nil, errors.Join(errs...)
}

// dialOne connects to one node.
func dialOne(url, name string) (*amqp.Connection, error) {
	props := amqp.NewConnectionProperties()
	props.SetClientConnectionName(name)
	conn, err := amqp.DialConfig(url, amqp.Config{
		Heartbeat:  5 * time.Second,
		Properties: props,
		Locale:     "en_US",
		// amqp091-go's default is 30 s: far too long for a daemon that
		// must step down or retry promptly.
		Dial: amqp.DefaultDial(DialTimeout),
	})
	if err != nil {
		// Say which URL failed, without its password; the broker's own
		// words are scrubbed too, whatever they quote.
		return nil, fmt.Errorf("dial %s: %w", config.Redact(url), config.RedactError(err, url))
	}
	return conn, nil
}

// Shuffled returns a copy of urls in a random order, so that the
// processes of a fleet given the same list spread over a cluster's nodes
// instead of all crowding the first.
func Shuffled(urls []string) []string {
	out := slices.Clone(urls)
	rand.Shuffle(len(out), func(i, j int) { out[i], out[j] = out[j], out[i] })
	return out
}

// Session is one connected period: fn runs with a live connection and
// returns when it is done with it (normally when the connection closed).
type Session func(ctx context.Context, conn *amqp.Connection) error

// Reconnector is phasecast's one reconnect loop, which keeps a connection
// up for the broadcaster's publisher and consumer, an agent's own
// connection and a SharedConnection alike: after every failed dial or
// lost connection it dials again, paced by retry.Reconnect (capped
// exponential backoff with jitter), for as long as its context lasts.
//
// With several URLs (a cluster's nodes) it tries them in turn, in an
// order shuffled for each Run: a failed dial moves on to the next URL at
// once, and the backoff applies only once every URL has failed in a row.
// After a lost connection it starts with the URL after the one it was
// on, so a process whose node died moves to another node rather than
// waiting for that one to come back.
type Reconnector struct {
	// URLs are the broker's nodes (config.SplitURLs of a configured
	// list). Required: Run with none only logs and retries.
	URLs []string
	Name string // the connection's name in the broker's management UI
	// Log receives one line per failed dial or lost connection, with the
	// delay before the next attempt. URLs and errors in it never show a
	// password.
	Log zerolog.Logger
	// First, if set, is a connection the caller dialled itself, so that a
	// broker it cannot reach fails its start at once (agent.Start). Run
	// serves it before it dials one.
	First *amqp.Connection
	// DialFailed, if set, hears of every failed dial as it happens, for a
	// caller that waits on the first attempt (SharedConnection).
	DialFailed func(error)
}

// Run runs fn on a live connection, closing the connection when fn
// returns, and then on the next one, until ctx is done. It returns ctx's
// error.
func (r Reconnector) Run(ctx context.Context, fn Session) error {
	backoff := retry.Reconnect()
	urls := Shuffled(r.URLs)
	next := 0 // index into urls of the next dial
	failedInRow := 0
	conn := r.First
	for {
		var err error
		url := ""
		if conn == nil && len(urls) > 0 {
			url = urls[next%len(urls)]
			next++
			if conn, err = dialOne(url, r.Name); err != nil {
				failedInRow++
				if r.DialFailed != nil {
					r.DialFailed(err)
				}
			}
		}
		if conn != nil {
			backoff.Reset()
			failedInRow = 0
			err = fn(ctx, conn)
			_ = conn.Close()
			conn = nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if err == nil && len(urls) == 0 {
			err = errors.New("no AMQP URL to dial")
		}
		// Another node may answer at once; wait only when each has
		// failed in a row, or after a session (the broker may be up but
		// refusing what the session needs).
		delay := time.Duration(0)
		if failedInRow == 0 || failedInRow >= len(urls) {
			delay = backoff.Next()
			failedInRow = 0
		}
		ev := r.Log.Warn().Err(config.RedactError(err, r.URLs...)).Dur("retry_in", delay)
		if url != "" {
			ev = ev.Str("amqp_url", config.Redact(url))
		}
		if len(urls) > 1 {
			ev = ev.Str("next_amqp_url", config.Redact(urls[next%len(urls)]))
		}
		ev.Msg("amqp connection lost; reconnecting")
		if err := retry.Sleep(ctx, delay); err != nil {
			return err
		}
	}
}

// CloseTimeout bounds CloseBounded: a broker that stopped answering must
// not hold up a Stop or a session's end for longer.
const CloseTimeout = time.Second

// CloseBounded closes conn, waiting at most CloseTimeout for the broker
// to answer the close.
func CloseBounded(conn *amqp.Connection) error {
	return conn.CloseDeadline(time.Now().Add(CloseTimeout))
}

// WatchClose returns a channel that yields the connection's close error and
// is closed when the connection closes. amqp091-go requires the notify
// channel to be drained, which the buffered receiver here guarantees.
func WatchClose(conn *amqp.Connection) <-chan *amqp.Error {
	return conn.NotifyClose(make(chan *amqp.Error, 1))
}
