package broadcaster

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"time"

	"github.com/lib/pq"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/phasecast/phasecast/internal/amqpx"
	"github.com/phasecast/phasecast/internal/config"
	"github.com/phasecast/phasecast/internal/retry"
	"github.com/phasecast/phasecast/internal/wire"
	"github.com/phasecast/phasecast/schema"
)

// Why a state is published, for the logs.
const (
	reasonStart  = "start"  // a term or a publishing connection began
	reasonNotify = "notify" // NOTIFY named a newer epoch, or LISTEN reconnected
	reasonOutbox = "outbox" // the poll found unpublished epochs
	reasonBeacon = "beacon" // nothing was published for BeaconInterval
	reasonRetry  = "retry"  // an earlier attempt failed
)

// brokerError marks a failure of the publishing connection itself: the
// session ends and the Reconnector dials again.
type brokerError struct{ err error }

func (e *brokerError) Error() string { return e.err.Error() }
func (e *brokerError) Unwrap() error { return e.err }

// listen turns the store's NOTIFYs into wakes of the publisher until ctx
// ends. lib/pq's Listener reconnects by itself and then sends a nil
// notification, because whatever was notified meanwhile is lost: that
// forces a relay. A LISTEN connection that died silently is covered by
// the outbox poll.
func (l *leader) listen(ctx context.Context) {
	channel := l.b.cfg.Store.NotifyChannel()
	log := l.log.With().Str("channel", channel).Logger()
	attempts := failureLog{what: "LISTEN connection attempt"}
	// The callback runs on the Listener's one dispatching goroutine.
	pl := pq.NewListener(l.b.listenDSN(), 100*time.Millisecond, 2*time.Second, func(ev pq.ListenerEventType, err error) {
		switch ev {
		case pq.ListenerEventConnected:
			attempts.report(log, nil)
			log.Debug().Msg("LISTEN connection established")
		case pq.ListenerEventReconnected:
			attempts.report(log, nil)
			log.Info().Msg("LISTEN connection re-established; relaying in case a notification was lost")
		case pq.ListenerEventDisconnected:
			log.Warn().Err(config.RedactError(err, l.b.cfg.DatabaseURL)).Msg("LISTEN connection lost; reconnecting (the outbox poll covers the gap)")
		case pq.ListenerEventConnectionAttemptFailed:
			attempts.report(log, config.RedactError(err, l.b.cfg.DatabaseURL))
		}
	})
	var wg sync.WaitGroup
	// Drain Notify until the Listener closes it: its goroutine blocks on a
	// full channel otherwise.
	wg.Go(func() {
		for n := range pl.Notify {
			if n == nil {
				l.force.Store(true)
			} else if e, err := strconv.ParseInt(n.Extra, 10, 64); err == nil {
				l.noteEpoch(e)
			} else {
				l.force.Store(true)
			}
			l.nudge()
		}
	})
	// Listen blocks until the connection is up; Close below unblocks it.
	wg.Go(func() {
		if err := pl.Listen(channel); err != nil && !errors.Is(err, net.ErrClosed) {
			log.Error().Err(err).Msg("LISTEN failed; relying on the outbox poll")
		}
	})
	<-ctx.Done()
	_ = pl.Close()
	wg.Wait()
}

// listenDSN is Config.DatabaseURL for LISTEN sessions. They carry the
// store's application_name, as the store's own sessions do, or every
// contract run would list them as sessions outside any agent and --strict
// could never pass while a broadcaster runs.
func (b *Broadcaster) listenDSN() string {
	dsn, err := config.WithApplicationName(b.cfg.DatabaseURL, schema.ApplicationName)
	if err != nil {
		return b.cfg.DatabaseURL // preflight connected with it as it is
	}
	return dsn
}

// listenProbeTimeout bounds how long probeListen waits for its own NOTIFY,
// which on a sound connection arrives in a millisecond or two.
const listenProbeTimeout = 3 * time.Second

// probeListen proves that a LISTEN on Config.DatabaseURL hears a NOTIFY
// sent through the store, on a channel of its own so that no running
// broadcaster hears it. Behind a transaction pooler the LISTEN stays on a
// server session that the pooler hands to other clients, and nothing
// reaches the listener: no error, no notification (the outbox poll would
// hide that as slowness). That is refused as a *schema.PoolerError.
func (b *Broadcaster) probeListen(ctx context.Context) error {
	nonce := make([]byte, 8)
	_, _ = rand.Read(nonce)
	channel := "phasecast.probe." + hex.EncodeToString(nonce)
	pl := pq.NewListener(b.listenDSN(), 100*time.Millisecond, time.Second, nil)
	var wg sync.WaitGroup
	heard := make(chan struct{})
	// Drain Notify until the Listener closes it.
	wg.Go(func() {
		closed := false
		for n := range pl.Notify {
			if n != nil && n.Channel == channel && !closed {
				close(heard)
				closed = true
			}
		}
	})
	defer func() {
		_ = pl.Close()
		wg.Wait()
	}()
	// Listen blocks until the connection is up: bound it by ctx.
	listened := make(chan error, 1)
	wg.Go(func() { listened <- pl.Listen(channel) })
	select {
	case err := <-listened:
		if err != nil {
			return fmt.Errorf("LISTEN on Config.DatabaseURL %s: %w", config.Redact(b.cfg.DatabaseURL), config.RedactError(err, b.cfg.DatabaseURL))
		}
	case <-ctx.Done():
		return fmt.Errorf("LISTEN on Config.DatabaseURL %s: %w", config.Redact(b.cfg.DatabaseURL), ctx.Err())
	}
	if err := b.cfg.Store.Notify(ctx, channel, "probe"); err != nil {
		return fmt.Errorf("NOTIFY through the store: %w", err)
	}
	wait := time.NewTimer(listenProbeTimeout)
	defer wait.Stop()
	select {
	case <-heard:
		return nil
	case <-wait.C:
		return &schema.PoolerError{What: "LISTEN", Detail: fmt.Sprintf("a LISTEN on Config.DatabaseURL heard nothing of a NOTIFY sent through the store within %s, with no error", listenProbeTimeout)}
	case <-ctx.Done():
		return ctx.Err()
	}
}

// publish runs publishing sessions until the term ends.
func (l *leader) publish(ctx context.Context) {
	_ = amqpx.Reconnector{URLs: l.b.amqpURLs(), Name: l.b.connName("publish"), Log: l.log, First: l.firstPublish}.
		Run(ctx, tracked(&l.publishing, l.publishSession))
}

// publishSession is one connected period of the publisher. It relays at
// once (a flip committed while nobody published, or while this connection
// was down, goes out now), then on every wake, outbox poll and beacon; and
// it sends the grants the consumer hands over.
func (l *leader) publishSession(ctx context.Context, conn *amqp.Connection) error {
	defer closeOnDone(ctx, conn)()
	connClosed := amqpx.WatchClose(conn)

	states, err := conn.Channel()
	if err != nil {
		return fmt.Errorf("open the state channel: %w", err)
	}
	defer states.Close()
	statesClosed := states.NotifyClose(make(chan *amqp.Error, 1))
	if err := states.Confirm(false); err != nil {
		return fmt.Errorf("put the state channel in confirm mode: %w", err)
	}
	if err := amqpx.DeclareStateExchange(states, l.b.cfg.ExchangePrefix); err != nil {
		return fmt.Errorf("declare exchange %s: %w", amqpx.StateExchange(l.b.cfg.ExchangePrefix), err)
	}
	// Grants are not confirmed: a lost grant costs the agent one
	// heartbeat, and its lease is already in the store.
	grants, err := conn.Channel()
	if err != nil {
		return fmt.Errorf("open the grant channel: %w", err)
	}
	defer grants.Close()
	grantsClosed := grants.NotifyClose(make(chan *amqp.Error, 1))
	if err := amqpx.DeclareGrantExchange(grants, l.b.cfg.ExchangePrefix); err != nil {
		return fmt.Errorf("declare exchange %s: %w", amqpx.GrantExchange(l.b.cfg.ExchangePrefix), err)
	}

	backoff := retry.Reconnect()
	poll := time.NewTicker(l.b.cfg.PollInterval)
	defer poll.Stop()
	beacon := time.NewTimer(l.b.cfg.BeaconInterval)
	defer beacon.Stop()
	retry := time.NewTimer(time.Hour)
	retry.Stop()
	defer retry.Stop()
	pollLog := failureLog{what: "outbox poll"}

	// relay publishes and sorts out what a failure means: the session ends
	// on a broker failure; anything else is retried after a backoff.
	relay := func(reason string) error {
		err := l.relay(ctx, states, reason)
		var be *brokerError
		switch {
		case err == nil:
			backoff.Reset()
			retry.Stop()
			beacon.Reset(l.b.cfg.BeaconInterval)
			return nil
		case ctx.Err() != nil:
			return nil
		case errors.As(err, &be):
			return err
		}
		delay := backoff.Next()
		l.log.Warn().Err(err).Str("reason", reason).Dur("retry_in", delay).Msg("state not published; will send again")
		retry.Reset(delay)
		return nil
	}

	if err := relay(reasonStart); err != nil {
		return err
	}
	for {
		var err error
		select {
		case <-ctx.Done():
			return nil
		case e := <-connClosed:
			return closedError("publishing connection", e)
		case e := <-statesClosed:
			return closedError("state channel", e)
		case e := <-grantsClosed:
			return closedError("grant channel", e)
		case <-l.wake:
			if l.force.Swap(false) || l.notified.Load() > l.lastConfirmed {
				err = relay(reasonNotify)
			}
		case <-poll.C:
			octx, cancel := context.WithTimeout(ctx, dbTimeout)
			unpublished, perr := l.b.cfg.Store.UnpublishedEpoch(octx)
			cancel()
			if ctx.Err() != nil {
				return nil
			}
			pollLog.report(l.log, perr)
			if perr == nil && unpublished > 0 {
				err = relay(reasonOutbox)
			}
		case <-beacon.C:
			err = relay(reasonBeacon)
		case <-retry.C:
			err = relay(reasonRetry)
		case batch := <-l.grants:
			err = l.sendGrants(ctx, grants, batch)
		}
		if err != nil {
			return err
		}
	}
}

// relay reads the whole state, publishes it and waits for the broker's
// confirm. It is the only place a state is signed, and it signs only what
// it has just read from the store: agents with a DB apply a signed state
// of their store without reading it themselves (agent
// Config.ConfirmSignedStates), so a signed state must be the store's word. Only a confirmed state marks the outbox: a nack, a timeout or a
// lost connection leaves the epochs unpublished, to be sent again.
func (l *leader) relay(ctx context.Context, ch *amqp.Channel, reason string) error {
	octx, cancel := context.WithTimeout(ctx, dbTimeout)
	st, err := l.b.cfg.Store.State(octx)
	cancel()
	if err != nil {
		return fmt.Errorf("read the state: %w", err)
	}
	l.b.noteStoreID(st.StoreID)
	st.SentAt = time.Now().UTC()
	body, err := wire.EncodeState(st)
	if err != nil {
		return fmt.Errorf("encode the state: %w", err)
	}
	exchange := amqpx.StateExchange(l.b.cfg.ExchangePrefix)
	sent := time.Now()
	dc, err := ch.PublishWithDeferredConfirmWithContext(ctx, exchange, "", false, false, l.b.message(wire.KindState, body))
	if err != nil {
		return &brokerError{fmt.Errorf("publish state at epoch %d: %w", st.Epoch, err)}
	}
	cctx, cancel := context.WithTimeout(ctx, confirmTimeout)
	acked, err := dc.WaitContext(cctx)
	cancel()
	switch {
	case ctx.Err() != nil:
		return ctx.Err()
	case err != nil:
		return &brokerError{fmt.Errorf("no confirm for the state at epoch %d within %s: %w", st.Epoch, confirmTimeout, err)}
	case !acked:
		l.publishing.Store(false)
		return fmt.Errorf("the broker nacked the state at epoch %d (or the channel closed)", st.Epoch)
	}
	l.publishing.Store(true)

	l.b.metrics.confirm.Observe(time.Since(sent).Seconds())
	l.b.stats.statesPublished.Add(1)
	if reason == reasonBeacon {
		l.b.stats.beaconsPublished.Add(1)
	}
	newer := st.Epoch > l.lastConfirmed
	l.lastConfirmed = max(l.lastConfirmed, st.Epoch)
	ev := l.log.Debug()
	if newer && reason != reasonBeacon {
		ev = l.log.Info()
	}
	ev.Int64("epoch", st.Epoch).Str("reason", reason).Int("releases", len(st.Releases)).Msg("state published")

	octx, cancel = context.WithTimeout(ctx, dbTimeout)
	defer cancel()
	unpublished, err := l.b.cfg.Store.UnpublishedEpoch(octx)
	if err != nil {
		return fmt.Errorf("state at epoch %d published, but reading the outbox failed: %w", st.Epoch, err)
	}
	// MarkPublished touches only rows up to st.Epoch, which this state
	// covers; a newer epoch has its own notification coming.
	if unpublished > 0 {
		l.watchFlips(octx, st.Epoch)
		if err := l.b.cfg.Store.MarkPublished(octx, st.Epoch); err != nil {
			return fmt.Errorf("state at epoch %d published, but marking the outbox failed: %w", st.Epoch, err)
		}
	}
	return nil
}

// sendGrants publishes a batch of grants on the grant exchange, each
// routed by its agent's recorded ID to that agent's own queue.
func (l *leader) sendGrants(ctx context.Context, ch *amqp.Channel, batch []outgoing) error {
	exchange := amqpx.GrantExchange(l.b.cfg.ExchangePrefix)
	for _, g := range batch {
		if err := ch.PublishWithContext(ctx, exchange, g.agentID, false, false, g.msg); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return &brokerError{fmt.Errorf("publish a grant: %w", err)}
		}
		l.b.stats.grantsSent.Add(1)
	}
	return nil
}
