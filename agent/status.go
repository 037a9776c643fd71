package agent

import (
	"context"
	"errors"
	"strconv"
	"time"

	"github.com/phasecast/phasecast/internal/amqpx"
	"github.com/phasecast/phasecast/internal/wire"
	"github.com/phasecast/phasecast/schema"
)

// The reasons of statuses the wire marks: the one sent when a drain
// completes, and the goodbye.
const (
	reasonAck     = "ack"
	reasonLeaving = "leaving"
)

// report sends a status: at start, after every drain (the ack), and as a
// heartbeat. Over the broker when connected; through the store (which also
// re-reads the state and renews the lease there) when there is a DB and
// the agent is fenced or has no usable broker connection, so acks reach
// the store without the broker.
//
// A status over the broker is sent under statusMu, so seqs go out in
// order, and its confirm is awaited after statusMu is released.
func (a *Agent) report(ctx context.Context, reason string) {
	a.statusMu.Lock()
	sess := a.session()
	if sess != nil && sess.blocked.Load() {
		sess = nil // the broker stopped reading: a publish would hang
	}
	if a.store != nil && (sess == nil || a.fenced.Load()) {
		_ = a.syncLocked(ctx, reason)
	}
	var sent *pendingStatus
	if sess != nil {
		sent = a.publishLocked(ctx, sess, reason)
	}
	a.statusMu.Unlock()
	if sent != nil && !a.awaitConfirm(ctx, sent) && a.store != nil {
		// The broker did not take it: the store does, now, rather than
		// the next connection.
		a.statusMu.Lock()
		_ = a.syncLocked(ctx, reason)
		a.statusMu.Unlock()
	}
}

// statusLocked numbers and fills the next status. SkipGrant is left to
// the caller.
func (a *Agent) statusLocked() wire.Status {
	seq := a.seq.Add(1)
	// drained before applied: drained never passes the applied epoch read
	// after it, and the wire refuses a status where it does.
	drained := a.drained.Load()
	applied := a.appliedEpoch()
	return wire.Status{
		V:            wire.StatusVersion,
		Kind:         wire.KindStatus,
		StoreID:      a.storeIdentity(),
		AgentID:      a.cfg.ID,
		Incarnation:  a.incarnation,
		Token:        a.token,
		Service:      a.cfg.Service,
		Host:         a.cfg.Host,
		PID:          a.pid,
		Version:      a.cfg.Version,
		Releases:     a.cfg.Releases,
		Seq:          seq,
		AppliedEpoch: max(applied, 0),
		DrainedEpoch: max(drained, 0),
		Inflight:     a.inflightOlder(),
		AppName:      a.cfg.ApplicationName,
		SentAt:       time.Now().UTC(),
	}
}

// publishLocked publishes the next status to the status queue and
// returns it for awaitConfirm, or nil when nothing was sent. Its send
// time is remembered before the publish, so it precedes the moment the
// broadcaster records it.
//
// Nothing is sent while the agent holds no state (an agent without a DB
// before its first state): it does not know the store its statuses belong
// to yet, and the broadcaster drops a status that names none. That costs
// start-up nothing: a grant cannot make such an agent ready anyway, and
// the acknowledgement of its first state, sent the moment it is applied,
// is the status that earns the grant Start waits for.
func (a *Agent) publishLocked(ctx context.Context, sess *session, reason string) *pendingStatus {
	if a.cur.Load() == nil {
		a.log.Debug().Str("reason", reason).Msg("no state yet: the status waits for the first one, which names the store")
		return nil
	}
	lease := a.leaseLength()
	st := a.statusLocked()
	// An ack renews nothing the heartbeats do not: while the lease is
	// fresh it asks for no grant, which halves a flip's messages back.
	st.SkipGrant = reason == reasonAck && a.leaseFresh()
	st.Leaving = reason == reasonLeaving
	body, err := wire.EncodeStatus(st)
	if err != nil {
		a.log.Error().Err(err).Msg("encoding status")
		return nil
	}
	var mac string
	if a.cfg.StatusMACKey != nil {
		mac = wire.MAC(a.cfg.StatusMACKey, body)
	}
	msg := amqpx.Publishing("phasecast-agent", wire.KindStatus, body, mac)
	// RabbitMQ refuses a user_id other than the connection's user, so the
	// broadcaster learns from it which broker user sent the status: the
	// principal the store checks when the status enrols the agent.
	msg.UserId = a.brokerUser
	// A status left in the queue longer than a lease is no longer news:
	// the broker drops it (the broadcaster checks sent_at too).
	msg.Expiration = strconv.FormatInt(max(lease.Milliseconds(), 1), 10)
	a.recordSent(st.Seq, time.Now())
	return a.publishStatus(ctx, sess, msg, st, reason)
}

// farewell sends the goodbye: over the broker when connected, else
// straight into the store when there is one. It is best effort: if it is
// lost, the lease runs out as it would have.
func (a *Agent) farewell(ctx context.Context) {
	a.statusMu.Lock()
	defer a.statusMu.Unlock()
	if sess := a.session(); sess != nil && !sess.blocked.Load() {
		// Stop waits for the goodbye's confirm under statusMu: nothing
		// else needs it any more.
		if sent := a.publishLocked(ctx, sess, reasonLeaving); sent == nil || a.awaitConfirm(ctx, sent) {
			return
		}
	}
	if a.store == nil {
		return
	}
	st := a.statusLocked()
	st.Leaving = true
	ctx, cancel := context.WithTimeout(ctx, syncTimeout)
	defer cancel()
	if _, err := a.store.SyncAgent(ctx, st, 0); err != nil {
		a.log.Warn().Err(err).Msg("recording the goodbye in the store failed; the lease will run out instead")
	}
}

// syncLocked is the path to the truth without the broker: Store.SyncAgent
// records the next status with a lease and reads the state in one
// transaction; the state is applied, then the local lease extended from a
// time taken before the transaction began (see resyncFenced for why that
// ordering keeps the invariant). Applying first means that once the fence
// lifts, Enter pins the fresh snapshot.
func (a *Agent) syncLocked(ctx context.Context, reason string) error {
	st := a.statusLocked()
	lease := a.leaseLength()
	t0 := time.Now()
	ctx, cancel := context.WithTimeout(ctx, syncTimeout)
	defer cancel()
	state, err := a.store.SyncAgent(ctx, st, lease)
	a.syncGen.Add(1)
	a.lastSyncErr = err
	if errors.Is(err, schema.ErrStatusIgnored) {
		// The state is the store's truth, read in the same transaction;
		// but no lease was granted, so the lease is left as it is and runs
		// out (or has): Enter refuses until a status of ours is recorded.
		a.lastSyncFail = time.Now()
		a.ignoredSyncs.Add(1)
		a.learnStore(state.StoreID)
		a.apply(&state)
		a.logIgnoredLocked(err, reason, st.Seq)
		return err
	}
	if err != nil {
		a.lastSyncFail = time.Now()
		a.resyncFailures.Add(1)
		a.log.Warn().Err(err).Str("reason", reason).Uint64("seq", st.Seq).Msg("re-sync from the store failed")
		return err
	}
	a.resyncs.Add(1)
	a.learnStore(state.StoreID)
	a.apply(&state)
	a.extendLease(t0, lease)
	a.log.Debug().Str("reason", reason).Uint64("seq", st.Seq).Int64("epoch", state.Epoch).Msg("re-synced from the store")
	return nil
}

// logIgnoredLocked says why the store ignored a status: at warn when the
// reason is new or the last warning is half a minute old (a conflicted
// agent syncs on every heartbeat), else at debug.
func (a *Agent) logIgnoredLocked(err error, reason string, seq uint64) {
	ev := a.log.Debug()
	if note := err.Error(); note != a.ignoredNote || time.Since(a.ignoredAt) >= ignoredWarnEvery {
		a.ignoredNote, a.ignoredAt = note, time.Now()
		ev = a.log.Warn()
	}
	ev.Err(err).Str("reason", reason).Uint64("seq", seq).Str("incarnation", a.incarnation).
		Msg("the store ignored this agent's status: no lease; fenced until it records one")
}

// ignoredWarnEvery is how often an ignored status that keeps recurring for
// the same reason is logged at warn.
const ignoredWarnEvery = 30 * time.Second

// confirm brings the agent to the store's state after a message claimed a
// newer epoch. If the newest state message is the store's current state
// (its digest is the one the store wrote with its last change: one row
// read), that message is applied; otherwise (the store moved on, the
// message is forged, or the store has no digest yet) the whole state is
// read from the store and applied. Either way only what the store vouches
// for is applied, so a forged state changes nothing. It only reads (no
// WAL, no commit flush), so a flip reaches the agent without waiting on
// the disk, and it leaves the lease alone: leases come from grants and
// from syncLocked, which also writes the agent's row.
func (a *Agent) confirm(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, syncTimeout)
	defer cancel()
	if msg := a.candidate.Swap(nil); msg != nil && msg.Epoch > a.appliedEpoch() {
		digest, err := a.store.StateDigest(ctx)
		if errors.Is(err, schema.ErrNotMigrated) && a.warnedNoDigest.CompareAndSwap(false, true) {
			a.log.Warn().Err(err).Msg("the store has no state digest yet: each confirmation reads the whole state until 'phasecast migrate' runs")
		}
		if err == nil && digest == msg.Digest() {
			a.digestConfirms.Add(1)
			a.apply(msg)
			a.log.Debug().Int64("epoch", msg.Epoch).Msg("state message confirmed by the store's digest")
			return nil
		}
	}
	state, err := a.store.State(ctx)
	if err != nil {
		a.resyncFailures.Add(1)
		a.log.Warn().Err(err).Msg("confirming a state message against the store failed")
		return err
	}
	a.resyncs.Add(1)
	a.learnStore(state.StoreID)
	a.apply(&state)
	a.log.Debug().Int64("epoch", state.Epoch).Msg("state confirmed from the store")
	return nil
}

// storeIdentity is the store id the agent's statuses name, empty while it
// knows none.
func (a *Agent) storeIdentity() string {
	if id := a.storeID.Load(); id != nil {
		return *id
	}
	return ""
}

// learnStore takes id as the store the agent's statuses belong to. With a
// DB it comes from the store's own reads, never from a message (a state
// message confirmed by digest says nothing about its store: the digest
// leaves the id out); without one, from the states the agent applies. An
// empty id (a store or broadcaster that predates store identities) leaves
// the one known.
func (a *Agent) learnStore(id string) {
	if id == "" {
		return
	}
	old := a.storeID.Swap(&id)
	switch {
	case old == nil:
		a.log.Debug().Str("store_id", id).Msg("store identity learnt")
	case *old != id:
		// The store was dropped and migrated again, or a state of another
		// store reached an agent without a DB.
		a.log.Warn().Str("store_id", id).Str("previous_store_id", *old).Msg("the store's identity changed")
	}
}

// offerCandidate keeps st for the confirmer if it is newer than the
// candidate already waiting.
func (a *Agent) offerCandidate(st *wire.State) {
	for {
		cur := a.candidate.Load()
		if cur != nil && cur.Epoch >= st.Epoch {
			return
		}
		if a.candidate.CompareAndSwap(cur, st) {
			return
		}
	}
}

func (a *Agent) recordSent(seq uint64, at time.Time) {
	a.sentMu.Lock()
	a.sent[seq%sentRing] = sentStatus{seq: seq, at: at}
	a.sentMu.Unlock()
}

// sentAt returns when the status with seq was sent, if it is recent enough
// to be remembered.
func (a *Agent) sentAt(seq uint64) (time.Time, bool) {
	a.sentMu.Lock()
	e := a.sent[seq%sentRing]
	a.sentMu.Unlock()
	return e.at, seq != 0 && e.seq == seq
}
