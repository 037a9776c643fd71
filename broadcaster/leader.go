package broadcaster

import (
	"context"
	"database/sql"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/rs/zerolog"

	"github.com/phasecast/phasecast/internal/amqpx"
	"github.com/phasecast/phasecast/schema"
)

// leaderLock is the leader lock's purpose (Store.LockKey) and its name in
// errors.
const (
	leaderLockPurpose = "leader"
	leaderLockName    = "the leader lock"
)

func newRunner(b *Broadcaster) *runner {
	return &runner{b: b, lockLog: failureLog{what: "leader lock attempt"}, touchLog: failureLog{what: "liveness write"}, probeLog: failureLog{what: "broker probe before leading"}}
}

// runner is the state of the run goroutine: leadership and liveness. Only
// that goroutine touches it (Start runs the first tick before starting it).
type runner struct {
	b        *Broadcaster
	term     *term     // non-nil while leading
	retryAt  time.Time // a standby does not try for the lock before this
	lockLog  failureLog
	touchLog failureLog
	// refused is why the last attempt for the lock refused to lead (a
	// transaction pooler), nil otherwise. Start returns it.
	refused  error
	probeLog failureLog
}

// term is one period of leadership: the connection that holds the lock and
// the leader work, which ends when the term does.
type term struct {
	conn   *sql.Conn
	lock   *schema.SessionLock
	l      *leader
	cancel context.CancelFunc
	wg     sync.WaitGroup
	// deafSince is when the term last stopped being able to publish and
	// consume (its start, until it first can); zero while it can.
	deafSince time.Time
}

func (r *runner) run(ctx context.Context) {
	t := time.NewTicker(r.b.cfg.LivenessInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			r.shutdown(ctx)
			return
		case <-t.C:
			r.tick(ctx)
		}
	}
}

// tick is one liveness round: the leader checks its lock, a standby tries
// to take it, and either writes its liveness row.
func (r *runner) tick(ctx context.Context) {
	if r.term != nil {
		if err := r.checkLock(ctx); err != nil && ctx.Err() == nil {
			r.stepDown(ctx, err)
		} else if err := r.checkBroker(time.Now()); err != nil {
			r.stepDown(ctx, err)
		}
	} else if !time.Now().Before(r.retryAt) {
		r.tryLead(ctx)
	}
	if ctx.Err() != nil {
		return
	}
	octx, cancel := context.WithTimeout(ctx, dbTimeout)
	defer cancel()
	err := r.b.cfg.Store.TouchBroadcaster(octx, schema.Broadcaster{ID: r.b.cfg.ID, Host: r.b.host, PID: r.b.pid, Leader: r.publishingLeader()})
	r.touchLog.report(r.b.log, err)
}

// tryLead takes the leader lock if it is free, on a connection of its own
// that then stays out of the pool for the whole term.
func (r *runner) tryLead(ctx context.Context) {
	octx, cancel := context.WithTimeout(ctx, dbTimeout)
	defer cancel()
	conn, err := r.b.cfg.Store.DB().Conn(octx)
	if err != nil {
		if ctx.Err() == nil {
			r.lockLog.report(r.b.log, err)
		}
		return
	}
	lock, got, err := r.b.cfg.Store.TryLockSession(octx, conn, leaderLockPurpose, leaderLockName)
	if err != nil {
		// The server may have granted the lock before the error reached
		// us: such a session must never go back to the pool.
		schema.Discard(conn)
		switch {
		case ctx.Err() != nil:
		case errors.Is(err, schema.ErrTransactionPooler):
			// Leading on a lock it cannot prove it holds would let two
			// broadcasters lead at once: refuse, loudly, and try again
			// later in case the connection string is fixed underneath.
			if r.refused == nil {
				r.b.log.Error().Err(err).Msg("refusing to lead")
			} else {
				r.b.log.Debug().Err(err).Msg("refusing to lead, again")
			}
			r.refused = err
			r.retryAt = time.Now().Add(2 * r.b.cfg.LivenessInterval)
		default:
			r.lockLog.report(r.b.log, err)
		}
		return
	}
	r.refused = nil
	r.lockLog.report(r.b.log, nil)
	if !got {
		_ = conn.Close()
		return
	}
	// Lead only with a broker in reach: a broadcaster that lost its
	// broker gives the lock back at once, so one that can reach a broker
	// gets it. The probe's connection becomes the publisher's first.
	probe, err := amqpx.Dial(r.b.cfg.AMQPURL, r.b.connName("publish"))
	r.probeLog.report(r.b.log, err)
	if err != nil {
		_ = lock.Release(octx)
		schema.Discard(conn)
		r.retryAt = time.Now().Add(2 * r.b.cfg.LivenessInterval)
		return
	}
	r.lead(ctx, conn, lock, probe)
	r.awaitHealthy(ctx, r.b.cfg.LivenessInterval)
}

// lead starts a term: the relay (publisher and listener) and the status
// consumer, all ended by the term's context.
func (r *runner) lead(ctx context.Context, conn *sql.Conn, lock *schema.SessionLock, firstPublish *amqp.Connection) {
	n := r.b.stats.takeovers.Add(1)
	r.b.leader.Store(true)
	tctx, cancel := context.WithCancel(ctx)
	l := newLeader(r.b)
	l.firstPublish = firstPublish
	t := &term{conn: conn, lock: lock, l: l, cancel: cancel, deafSince: time.Now()}
	t.wg.Go(func() { l.listen(tctx) })
	t.wg.Go(func() { l.publish(tctx) })
	t.wg.Go(func() { l.consume(tctx) })
	t.wg.Go(func() { l.watchConvergence(tctx) })
	r.term = t
	r.b.log.Info().Int64("takeovers", n).Msg("became leader: relaying state and consuming statuses")
}

// checkLock makes sure the term's connection is alive and its session
// still holds the lock (SessionLock.Verify). If not, another broadcaster
// may already lead.
func (r *runner) checkLock(ctx context.Context) error {
	octx, cancel := context.WithTimeout(ctx, dbTimeout)
	defer cancel()
	return r.term.lock.Verify(octx)
}

// stepDown ends the term: leader work is cancelled and waited for, then
// the lock goes. With a cause (the lock connection failed) the standby
// waits two liveness rounds before trying again, so that a healthy
// standby elsewhere wins; without one (Stop) the lock is released at once.
func (r *runner) stepDown(ctx context.Context, cause error) {
	t := r.term
	r.term = nil
	r.b.leader.Store(false)
	r.b.stats.stepDowns.Add(1)
	t.cancel()
	t.wg.Wait()
	switch {
	case errors.Is(cause, schema.ErrTransactionPooler):
		// The session moved under the term: closing the connection would
		// not end the server session that holds the lock, so release it
		// there if it can be reached.
		r.retryAt = time.Now().Add(2 * r.b.cfg.LivenessInterval)
		r.b.log.Error().Err(cause).Msg("lost leadership: the leader lock's session is shared; leader work stopped, refusing to lead")
		if err := t.lock.Release(ctx); err != nil {
			r.b.log.Error().Err(err).Msg("cleaning up the leader lock on the shared session")
		}
	case errors.Is(cause, errBrokerLost):
		r.retryAt = time.Now().Add(2 * r.b.cfg.LivenessInterval)
		if err := t.lock.Release(ctx); err != nil {
			r.b.log.Warn().Err(err).Msg("releasing the leader lock failed; closing its connection releases it")
		}
		r.b.log.Warn().Err(cause).Msg("stepped down: released the leader lock so a standby that reaches a broker leads; contending again once a broker answers")
	case cause != nil:
		r.retryAt = time.Now().Add(2 * r.b.cfg.LivenessInterval)
		r.b.log.Warn().Err(cause).Msg("lost leadership: the leader lock's connection failed; leader work stopped, standing by")
	default:
		if err := t.lock.Release(ctx); err != nil {
			r.b.log.Error().Err(err).Msg("stepped down, but releasing the leader lock failed")
		} else {
			r.b.log.Info().Msg("stepped down: leader lock released")
		}
	}
	// Never pool a session that held the lock: closing it ends the
	// session, and PostgreSQL releases a session's locks with it, so the
	// lock is gone whatever happened above.
	schema.Discard(t.conn)
}

// shutdown runs when Stop cancelled the run: it ends the term and removes
// the liveness row, bounded by cleanupTimeout rather than by the cancelled
// context.
func (r *runner) shutdown(ctx context.Context) {
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
	defer cancel()
	if r.term != nil {
		r.stepDown(cctx, nil)
	}
	if err := r.b.cfg.Store.RemoveBroadcaster(cctx, r.b.cfg.ID); err != nil {
		r.b.log.Warn().Err(err).Msg("removing the liveness row failed; it ages out")
	}
}

// leader is the shared state of one term's goroutines.
type leader struct {
	b         *Broadcaster
	log       zerolog.Logger
	rejectLog zerolog.Logger // sampled: a flood of bad statuses is not a flood of logs

	// wake is buffered by one: any number of wakes while a relay runs
	// become one more relay.
	wake chan struct{}
	// notified is the highest epoch a notification named; force asks for a
	// relay whatever the epochs say (the listener reconnected, or a
	// notification named no epoch).
	notified atomic.Int64
	force    atomic.Bool

	// grants carries encoded grants from the consumer to the publishing
	// connection.
	grants chan []outgoing

	// Owned by the publisher goroutine.
	lastConfirmed int64

	// conv watches the flips this term published for convergence.
	conv         *convergence
	firstPublish *amqp.Connection // the probe tryLead dialled, served first

	brokerHealth
}

// outgoing is one grant for the grant exchange.
type outgoing struct {
	agentID string // the routing key on the grant exchange: the ID the store recorded
	msg     amqp.Publishing
}

// grantBacklog is how many batches of grants may wait for the publishing
// connection before new ones are dropped.
const grantBacklog = 64

func newLeader(b *Broadcaster) *leader {
	return &leader{
		b:         b,
		log:       b.log,
		rejectLog: b.log.Sample(&zerolog.BurstSampler{Burst: 10, Period: time.Second}),
		wake:      make(chan struct{}, 1),
		grants:    make(chan []outgoing, grantBacklog),
		conv:      newConvergence(),
	}
}

// nudge asks the publisher for a relay without ever blocking.
func (l *leader) nudge() {
	select {
	case l.wake <- struct{}{}:
	default:
	}
}

// noteEpoch records an epoch a notification named.
func (l *leader) noteEpoch(e int64) {
	for {
		cur := l.notified.Load()
		if e <= cur || l.notified.CompareAndSwap(cur, e) {
			return
		}
	}
}
