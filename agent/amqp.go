package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/phasecast/phasecast/internal/amqpx"
	"github.com/phasecast/phasecast/internal/config"
	"github.com/phasecast/phasecast/internal/retry"
	"github.com/phasecast/phasecast/internal/wire"
)

// session is one live broker connection's publishing side.
type session struct {
	pub     *amqp.Channel // in confirm mode: every status is confirmed
	queue   string        // this connection's server-named queue: grants come here
	blocked *atomic.Bool  // the link's flag: the broker blocked publishing (resource alarm)
	// returns hears of statuses the broker could not route (the status
	// queue is missing); returnedStatus drains it into returned, by
	// message id, after each confirm. The library closes it with the
	// channel.
	returns  <-chan amqp.Return
	retMu    sync.Mutex
	returned map[string]amqp.Return // under retMu
	// aborted is closed (once, by abort) when a status was not
	// confirmed: the session ends, and with it an own connection, which
	// abort also closes at once, bounded, since the broker may not answer.
	aborted   chan struct{}
	abortOnce sync.Once
	conn      *amqp.Connection // nil on a shared connection, which other agents use
}

// statusReturnBuffer bounds the returns waiting to be drained. Each
// status in flight can cause one, and only the few goroutines that send
// statuses (heartbeat, drain, session start, Stop) have one in flight at
// a time; the library blocks on a full channel, and with it the
// confirms that lead to the drain.
const statusReturnBuffer = 16

// newSession sets up the publishing side of a session on pub, which must
// be in confirm mode.
func newSession(pub *amqp.Channel, queue string, blocked *atomic.Bool, conn *amqp.Connection) *session {
	return &session{
		pub: pub, queue: queue, blocked: blocked, conn: conn,
		returns:  pub.NotifyReturn(make(chan amqp.Return, statusReturnBuffer)),
		returned: map[string]amqp.Return{},
		aborted:  make(chan struct{}),
	}
}

// returnedStatus reports whether the broker returned the message with
// id. It drains what the library handed over so far: the broker sends a
// message's return before its confirm, and the library hands the return
// over before it handles the confirm, so after the confirm it is there.
func (s *session) returnedStatus(id string) (amqp.Return, bool) {
	s.retMu.Lock()
	defer s.retMu.Unlock()
	for drained := false; !drained; {
		select {
		case ret, ok := <-s.returns:
			if !ok {
				drained = true
				break
			}
			s.returned[ret.MessageId] = ret
		default:
			drained = true
		}
	}
	ret, ok := s.returned[id]
	delete(s.returned, id)
	return ret, ok
}

func (s *session) isAborted() bool {
	select {
	case <-s.aborted:
		return true
	default:
		return false
	}
}

// abort ends the session; the Reconnector then dials, the next node first.
func (s *session) abort() {
	s.abortOnce.Do(func() {
		close(s.aborted)
		if s.conn != nil {
			_ = amqpx.CloseBounded(s.conn)
		}
	})
}

// session returns the live session, or nil while there is none or the
// current one was aborted: statuses then take the way without the broker.
func (a *Agent) session() *session {
	a.sessMu.RLock()
	defer a.sessMu.RUnlock()
	if a.sess != nil && a.sess.isAborted() {
		return nil
	}
	return a.sess
}

func (a *Agent) setSession(s *session) {
	a.sessMu.Lock()
	a.sess = s
	a.sessMu.Unlock()
}

func (a *Agent) connName() string { return "phasecast-agent " + a.cfg.ID }

// dialBroker is Start's synchronous first attempt, so that Start can tell
// an unreachable broker from a slow broadcaster. With Config.Connection it
// waits for the shared connection's current attempt instead (at most
// amqpx.DialTimeout) and returns no connection: the session loop takes it
// from the SharedConnection.
func (a *Agent) dialBroker(ctx context.Context) (*amqp.Connection, error) {
	if c := a.cfg.Connection; c != nil {
		wctx, cancel := context.WithTimeout(ctx, amqpx.DialTimeout)
		defer cancel()
		_, err := c.await(wctx, true)
		return nil, err
	}
	return amqpx.Dial(a.cfg.AMQPURL, a.connName())
}

// amqpLoop runs a session on first (Start's connection, if it dialled),
// then reconnects for as long as the agent runs.
func (a *Agent) amqpLoop(r *runState, first *amqp.Connection) {
	if a.cfg.Connection != nil {
		a.sharedLoop(r)
		return
	}
	own := amqpx.Reconnector{URLs: config.SplitURLs(a.cfg.AMQPURL), Name: a.connName(), Log: a.log, First: first}
	_ = own.Run(r.ctx, func(ctx context.Context, conn *amqp.Connection) error {
		return a.runSession(ctx, r, ownLink(conn))
	})
}

// sharedLoop runs sessions on Config.Connection for as long as the agent
// runs. The SharedConnection dials and re-dials; a session that ended
// while the connection lives on (a channel error) is retried on it after
// a backoff. A session opens channels of its own and closes them when it
// ends, which deletes its auto-delete queue.
func (a *Agent) sharedLoop(r *runState) {
	backoff := retry.Reconnect()
	var last *link
	for {
		l, err := a.cfg.Connection.await(r.ctx, false)
		if err != nil {
			return // the agent stops, or the connection was closed for good
		}
		if l != last {
			backoff.Reset()
		}
		last = l
		err = a.runSession(r.ctx, r, l)
		if r.ctx.Err() != nil {
			return
		}
		if l.isDown() {
			a.log.Warn().Err(err).Msg("shared amqp connection lost; waiting for it to reconnect")
			continue
		}
		delay := backoff.Next()
		a.log.Warn().Err(err).Dur("retry_in", delay).Msg("amqp session ended; opening it again")
		if retry.Sleep(r.ctx, delay) != nil {
			return
		}
	}
}

// runSession sets up one connection: the state exchange, a server-named
// exclusive auto-delete queue bound to it and to the grant exchange under
// the agent's ID, a consuming channel and a publishing
// channel. It sends a status at once, then handles deliveries until the
// connection, either channel or the consumer goes away, or ctx ends.
func (a *Agent) runSession(ctx context.Context, r *runState, l *link) error {
	conn := l.conn
	sub, err := conn.Channel()
	if err != nil {
		return fmt.Errorf("open consuming channel: %w", err)
	}
	if l.shared {
		// The connection outlives the session: close what the session
		// opened. Closing the consuming channel cancels the consumer, so
		// the broker deletes the auto-delete queue.
		defer sub.Close()
	}
	subClosed := sub.NotifyClose(make(chan *amqp.Error, 1))
	cancelled := sub.NotifyCancel(make(chan string, 1))
	prefix := a.cfg.ExchangePrefix
	if err := amqpx.EnsureStateExchange(conn, prefix); err != nil {
		return fmt.Errorf("declare exchange %s: %w", amqpx.StateExchange(prefix), err)
	}
	if err := amqpx.EnsureGrantExchange(conn, prefix); err != nil {
		return fmt.Errorf("declare exchange %s: %w", amqpx.GrantExchange(prefix), err)
	}
	q, err := sub.QueueDeclare("", false, true, true, false, nil)
	if err != nil {
		return fmt.Errorf("declare agent queue: %w", err)
	}
	if err := sub.QueueBind(q.Name, "", amqpx.StateExchange(prefix), false, nil); err != nil {
		return fmt.Errorf("bind %s to %s: %w", q.Name, amqpx.StateExchange(prefix), err)
	}
	// Grants for this agent's ID, and only those, come through the grant
	// exchange: the broadcaster routes each by the ID the store recorded,
	// never by anything a status says.
	if err := sub.QueueBind(q.Name, a.cfg.ID, amqpx.GrantExchange(prefix), false, nil); err != nil {
		return fmt.Errorf("bind %s to %s: %w", q.Name, amqpx.GrantExchange(prefix), err)
	}
	// Auto-ack: a state or grant lost with a connection is harmless, as
	// the next beacon and the next heartbeat's grant replace it.
	deliveries, err := sub.Consume(q.Name, "", true, true, false, false, nil)
	if err != nil {
		return fmt.Errorf("consume %s: %w", q.Name, err)
	}
	pub, err := conn.Channel()
	if err != nil {
		return fmt.Errorf("open publishing channel: %w", err)
	}
	if l.shared {
		defer pub.Close()
	}
	pubClosed := pub.NotifyClose(make(chan *amqp.Error, 1))
	if err := pub.Confirm(false); err != nil {
		return fmt.Errorf("put the publishing channel in confirm mode: %w", err)
	}
	var own *amqp.Connection
	if !l.shared {
		own = conn
	}
	sess := newSession(pub, q.Name, l.blocked, own)
	a.setSession(sess)
	defer a.setSession(nil)
	reconnect := r.sessions.Add(1) > 1
	a.log.Info().Str("queue", q.Name).Bool("reconnect", reconnect).Msg("connected to the broker")
	if reconnect {
		a.reconnects.Add(1)
		// Whatever was published while we were away is lost: re-sync
		// before trusting the cache. With a DB that is a read of the
		// store; without one, the status below is answered by a grant
		// whose epoch says whether we are behind, and the next beacon
		// brings the state.
		if a.store != nil {
			a.statusMu.Lock()
			_ = a.syncLocked(ctx, "reconnect")
			a.statusMu.Unlock()
		}
	}
	a.report(ctx, "connected")

	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case d, ok := <-deliveries:
			if !ok {
				return errors.New("the broker closed the consumer")
			}
			a.handle(r, d)
		case err, ok := <-l.connClosed:
			if !ok || err == nil {
				return errors.New("connection closed")
			}
			return err
		case <-sess.aborted:
			return errors.New("a status was not confirmed")
		case <-l.down:
			return fmt.Errorf("shared connection lost: %w", l.downErr)
		case err, ok := <-subClosed:
			if !ok || err == nil {
				return errors.New("consuming channel closed")
			}
			return err
		case err, ok := <-pubClosed:
			if !ok || err == nil {
				return errors.New("publishing channel closed")
			}
			return err
		case tag, ok := <-cancelled:
			if !ok {
				return errors.New("consuming channel closed")
			}
			return fmt.Errorf("the broker cancelled consumer %s (queue %s deleted?)", tag, q.Name)
		case b, ok := <-l.blockedCh:
			if !ok {
				return errors.New("connection closed")
			}
			sess.blocked.Store(b.Active)
			a.log.Warn().Bool("blocked", b.Active).Str("reason", b.Reason).Msg("broker flow control")
		}
	}
}

// handle dispatches one delivery. Nothing a message holds can stop the
// agent: a bad message is logged, counted and dropped.
func (a *Agent) handle(r *runState, d amqp.Delivery) {
	body := d.Body
	if err := wire.CheckSize(body); err != nil {
		a.reject(rejTooLarge, err, -1)
		return
	}
	if a.cfg.StateKey != nil {
		sig, _ := d.Headers[wire.SignatureHeader].(string)
		verify := wire.Verify
		if c := a.cfg.Connection; c != nil && wire.Kind(d.Type) == wire.KindState {
			// The agents on a shared connection all get this same
			// state: verified once for all of them.
			verify = c.verifyState
		}
		if err := verify(a.cfg.StateKey, body, sig); err != nil {
			a.reject(reasonFor(err), err, -1)
			return
		}
	}
	// The broadcaster names the kind in the AMQP type property, which
	// saves parsing the body twice; the decoders check the body's own
	// kind, so a wrong type property gets a message rejected, never
	// misread. Without one, the body says.
	kind := wire.Kind(d.Type)
	if kind != wire.KindState && kind != wire.KindGrant {
		var peek struct {
			Kind wire.Kind `json:"kind"`
		}
		if err := json.Unmarshal(body, &peek); err != nil {
			a.reject(rejMalformed, err, -1)
			return
		}
		kind = peek.Kind
	}
	switch kind {
	case wire.KindState:
		a.handleState(body)
	case wire.KindGrant:
		a.handleGrant(r, body)
	default:
		a.reject(rejKind, fmt.Errorf("kind %q on the agent queue", kind), -1)
	}
}

// handleState applies a state newer than the one held. With a DB the
// message only says "look" unless the store's word comes with it (see
// signedByStore): the confirmer applies it only if the store vouches for
// it (see confirm).
func (a *Agent) handleState(body []byte) {
	st, err := a.decodeState(body)
	if err != nil {
		a.reject(reasonFor(err), err, -1)
		return
	}
	if a.store == nil && (st.Epoch > a.appliedEpoch() || a.storeIdentity() == "") {
		// Before the state is applied, so that the acknowledgement it
		// brings names the store. A state not newer than the one held
		// teaches the store only to an agent that knows none (its
		// states came from a broadcaster that predates store ids).
		a.learnStore(st.StoreID)
	}
	if st.Epoch <= a.appliedEpoch() {
		a.ignoredStates.Add(1)
		return
	}
	if a.store != nil && !a.signedByStore(st) {
		a.offerCandidate(st)
		a.requestConfirm(st.Epoch)
		return
	}
	if a.store != nil {
		a.signedStates.Add(1)
	}
	a.apply(st)
}

// decodeState decodes a state message; on a shared connection, once for
// every agent on it. The state is not to be changed: other agents may
// hold it.
func (a *Agent) decodeState(body []byte) (*wire.State, error) {
	if c := a.cfg.Connection; c != nil {
		return c.decodeState(body)
	}
	st, err := wire.DecodeState(body)
	return &st, err
}

// signedByStore reports whether an agent with a DB may apply st without
// reading the store: its signature was verified against Config.StateKey
// (handle drops a state that fails it before this is asked), the
// broadcaster signs only what it has just read from the store, and the
// signed body names the store this agent read its own identity from. So
// the store said this state, at this epoch; the epoch check before this
// keeps an old one from being applied again. Anything else (no key, a
// state naming another store or none, Config.ConfirmSignedStates) goes
// to the store.
func (a *Agent) signedByStore(st *wire.State) bool {
	return a.cfg.StateKey != nil && !a.cfg.ConfirmSignedStates &&
		st.StoreID != "" && st.StoreID == a.storeIdentity()
}

// handleGrant extends the lease from the send time of the status it
// answers, unless it says the agent is behind.
func (a *Agent) handleGrant(r *runState, body []byte) {
	g, err := wire.DecodeGrant(body)
	if err != nil {
		a.reject(reasonFor(err), err, -1)
		return
	}
	if g.AgentID != a.cfg.ID {
		a.reject(rejWrongAgent, fmt.Errorf("grant for agent %q", g.AgentID), g.Epoch)
		return
	}
	// Another process under the same ID (a conflict) binds the same
	// routing key: a grant for its incarnation extends nothing here.
	if g.Incarnation != a.incarnation {
		a.reject(rejWrongAgent, fmt.Errorf("grant for incarnation %q of agent %q", g.Incarnation, g.AgentID), g.Epoch)
		return
	}
	sentAt, ok := a.sentAt(g.Seq)
	if !ok {
		a.reject(rejUnknownSeq, fmt.Errorf("grant for seq %d", g.Seq), g.Epoch)
		return
	}
	a.leaseMS.Store(g.LeaseMS)
	if applied := a.appliedEpoch(); g.Epoch > applied {
		// The store had a newer epoch when it recorded our status: we
		// missed a state. Extending the lease now would let us serve on
		// the old snapshot for another lease; instead let it run out
		// while we catch up.
		a.behindGrants.Add(1)
		a.log.Info().Int64("grant_epoch", g.Epoch).Int64("applied_epoch", applied).Msg("grant says we are behind; not extending the lease")
		if a.store != nil {
			a.requestConfirm(g.Epoch)
		}
		return
	}
	if g.Lease() <= a.cfg.LeaseMargin {
		a.log.Warn().Dur("lease", g.Lease()).Dur("lease_margin", a.cfg.LeaseMargin).Msg("granted lease is no longer than Config.LeaseMargin; it cannot extend anything")
	}
	if a.extendLease(sentAt, g.Lease()) {
		r.markReady()
	}
}

// reject counts a dropped message and logs it; after the first few of a
// kind, only every thousandth, so a flood cannot flood the log.
func (a *Agent) reject(reason rejectReason, err error, epoch int64) {
	n := a.rejected[reason].Add(1)
	if n > 10 && n%1000 != 0 {
		return
	}
	ev := a.log.Warn().Str("reason", reason.String()).Int64("count", n)
	if err != nil {
		ev = ev.Err(err)
	}
	if epoch >= 0 {
		ev = ev.Int64("epoch", epoch)
	}
	ev.Msg("message rejected")
}

// pendingStatus is a status published and not yet confirmed.
type pendingStatus struct {
	sess   *session
	dc     *amqp.DeferredConfirmation
	err    error // the publish itself failed
	seq    uint64
	reason string
	st     wire.Status
}

// publishStatus publishes msg to the status queue, mandatory, so that a
// status queue that does not exist returns the status instead of
// dropping it in silence. awaitConfirm waits for the broker's word.
func (a *Agent) publishStatus(ctx context.Context, sess *session, msg amqp.Publishing, st wire.Status, reason string) *pendingStatus {
	msg.MessageId = strconv.FormatUint(st.Seq, 10)
	ctx, cancel := context.WithTimeout(ctx, a.cfg.StatusConfirmTimeout)
	defer cancel()
	p := &pendingStatus{sess: sess, seq: st.Seq, reason: reason, st: st}
	p.dc, p.err = sess.pub.PublishWithDeferredConfirmWithContext(ctx, "", amqpx.StatusQueue(a.cfg.ExchangePrefix), true, false, msg)
	return p
}

// awaitConfirm waits for the broker's confirm of p, at most
// Config.StatusConfirmTimeout, and reports whether the broker took the
// status. A nack, a return, or no confirm in time (a quorum queue without
// a leader, a node gone silent) is logged and counted, and ends the
// session. It runs without statusMu: a slow broker must not hold up the
// statuses that go through the store meanwhile.
func (a *Agent) awaitConfirm(ctx context.Context, p *pendingStatus) bool {
	err := p.err
	if err != nil {
		err = fmt.Errorf("publish: %w", err)
	} else {
		ctx, cancel := context.WithTimeout(ctx, a.cfg.StatusConfirmTimeout)
		acked, werr := p.dc.WaitContext(ctx)
		cancel()
		switch {
		case werr != nil:
			err = fmt.Errorf("no confirm within %s: %w", a.cfg.StatusConfirmTimeout, werr)
		case !acked:
			err = errors.New("the broker nacked it")
		default:
			if ret, returned := p.sess.returnedStatus(strconv.FormatUint(p.seq, 10)); returned {
				err = fmt.Errorf("the broker returned it: %d %s (does queue %s exist?)", ret.ReplyCode, ret.ReplyText, amqpx.StatusQueue(a.cfg.ExchangePrefix))
			}
		}
	}
	if err != nil {
		a.unconfirmedStatuses.Add(1)
		a.log.Warn().Err(err).Uint64("seq", p.seq).Str("reason", p.reason).
			Msg("status not confirmed by the broker; reconnecting (with a DB the status goes through the store now, else the new connection's first status carries this state)")
		p.sess.abort()
		return false
	}
	a.log.Debug().Uint64("seq", p.seq).Str("reason", p.reason).Int64("applied_epoch", p.st.AppliedEpoch).
		Int64("drained_epoch", p.st.DrainedEpoch).Int64("inflight", p.st.Inflight).Msg("status sent")
	return true
}
