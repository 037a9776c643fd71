package broadcaster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/lib/pq"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/phasecast/phasecast/internal/amqpx"
	"github.com/phasecast/phasecast/internal/retry"
	"github.com/phasecast/phasecast/internal/wire"
	"github.com/phasecast/phasecast/schema"
)

// maxBodyExcerpt bounds how much of a rejected body is logged.
const maxBodyExcerpt = 200

// consume runs consuming sessions until the term ends.
func (l *leader) consume(ctx context.Context) {
	_ = amqpx.Reconnector{URLs: l.b.amqpURLs(), Name: l.b.connName("consume"), Log: l.log}.Run(ctx, tracked(&l.consuming, l.consumeSession))
}

// deliverySource is everything a consuming session waits on.
type deliverySource struct {
	deliveries <-chan amqp.Delivery
	connClosed <-chan *amqp.Error
	chClosed   <-chan *amqp.Error
	cancelled  <-chan string
}

// consumeSession is one connected period of the status consumer: it
// collects statuses into batches, records each batch in one transaction,
// grants leases and acks. A delivery is acked only after the transaction
// that recorded it committed, so a crash loses nothing: the broker
// redelivers, and the replay is recognised by its seq.
func (l *leader) consumeSession(ctx context.Context, conn *amqp.Connection) error {
	defer closeOnDone(ctx, conn)()
	src := deliverySource{connClosed: amqpx.WatchClose(conn)}
	queue := amqpx.StatusQueue(l.b.cfg.ExchangePrefix)
	kept, err := amqpx.DeclareStatusQueueAs(conn, l.b.cfg.ExchangePrefix, l.b.cfg.StatusQueueType)
	if err != nil {
		return fmt.Errorf("declare queue %s: %w", queue, err)
	}
	if kept {
		l.log.Info().Str("queue", queue).Str("status_queue_type", l.b.cfg.StatusQueueType).
			Msg("the status queue exists with other arguments (a quorum queue an earlier release declared?): used as it is; delete it while no broadcaster runs to have it declared as configured")
	}
	ch, err := conn.Channel()
	if err != nil {
		return fmt.Errorf("open the status channel: %w", err)
	}
	defer ch.Close()
	src.chClosed = ch.NotifyClose(make(chan *amqp.Error, 1))
	src.cancelled = ch.NotifyCancel(make(chan string, 1))
	// Twice a batch in flight: the next batch fills while one is written.
	if err := ch.Qos(2*l.b.cfg.StatusBatchMax, 0, false); err != nil {
		return fmt.Errorf("set the prefetch: %w", err)
	}
	src.deliveries, err = ch.Consume(queue, "phasecast-broadcaster-"+l.b.cfg.ID, false, false, false, false, nil)
	if err != nil {
		return fmt.Errorf("consume %s: %w", queue, err)
	}
	l.log.Info().Str("queue", queue).Msg("consuming statuses")
	l.consuming.Store(true)
	backoff := retry.Reconnect()
	dbLog := failureLog{what: "recording statuses"}
	for {
		batch, err := l.collect(ctx, src)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		if err := l.handleBatch(ctx, ch, batch, &backoff, &dbLog); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
	}
}

// collect waits for a first delivery, then gathers more until the batch
// is full, StatusBatchWait has passed, or no delivery came for
// StatusBatchGap.
func (l *leader) collect(ctx context.Context, src deliverySource) ([]amqp.Delivery, error) {
	var batch []amqp.Delivery
	var deadline, quiet <-chan time.Time
	var quietTimer *time.Timer
	for {
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case e := <-src.connClosed:
			return nil, closedError("consuming connection", e)
		case e := <-src.chClosed:
			return nil, closedError("status channel", e)
		case tag, ok := <-src.cancelled:
			if !ok {
				return nil, errors.New("status channel closed")
			}
			return nil, fmt.Errorf("the broker cancelled consumer %s (was the status queue deleted?)", tag)
		case d, ok := <-src.deliveries:
			if !ok {
				return nil, errors.New("the status delivery channel closed")
			}
			batch = append(batch, d)
			if len(batch) >= l.b.cfg.StatusBatchMax {
				return batch, nil
			}
			if deadline == nil {
				t := time.NewTimer(l.b.cfg.StatusBatchWait)
				defer t.Stop()
				deadline = t.C
				quietTimer = time.NewTimer(l.b.cfg.StatusBatchGap)
				defer quietTimer.Stop()
				quiet = quietTimer.C
			} else {
				quietTimer.Reset(l.b.cfg.StatusBatchGap)
			}
		case <-deadline:
			return batch, nil
		case <-quiet:
			return batch, nil
		}
	}
}

// pending is a valid status, the principal that sent it and the delivery
// that carried it.
type pending struct {
	status    wire.Status
	principal string
	delivery  amqp.Delivery
}

// principalOf is who sent a delivery: the broker user in its user_id
// property, which RabbitMQ refuses unless it is the publishing
// connection's user; "" without one.
func principalOf(d amqp.Delivery) string {
	if d.UserId == "" {
		return ""
	}
	return schema.PrincipalAMQP + ":" + d.UserId
}

// handleBatch rejects what cannot be a status, records the rest in one
// transaction, grants leases and acks. A database failure nacks the batch
// back to the queue and backs off; it never ends the consumer. The
// returned error is the channel's.
func (l *leader) handleBatch(ctx context.Context, ch *amqp.Channel, batch []amqp.Delivery, backoff *retry.Backoff, dbLog *failureLog) error {
	valid := make([]pending, 0, len(batch))
	for _, d := range batch {
		st, reason, err := l.b.decodeStatus(d)
		if err != nil {
			l.rejected(d, reason, err)
			// requeue=false: dropped, or dead-lettered if the operator set
			// a dead-letter exchange on the queue.
			if err := d.Nack(false, false); err != nil {
				return err
			}
			continue
		}
		valid = append(valid, pending{st, principalOf(d), d})
	}
	if len(valid) == 0 {
		return nil
	}
	// Deliveries are in tag order and every invalid one is already
	// settled: one multiple ack or nack on the last tag settles the batch.
	last := valid[len(valid)-1].delivery.DeliveryTag
	valid, rec, err := l.record(ctx, valid)
	at := time.Now()
	if err != nil {
		if ctx.Err() != nil {
			return nil // the channel closes with the session: the broker requeues
		}
		dbLog.report(l.log, err)
		if err := ch.Nack(last, true, true); err != nil {
			return err
		}
		return retry.Sleep(ctx, backoff.Next())
	}
	dbLog.report(l.log, nil)
	backoff.Reset()
	if l.b.cfg.OnRecorded != nil {
		l.b.cfg.OnRecorded(at, recordedStatuses(valid, rec))
	}
	l.grant(valid, rec)
	l.conv.wake()
	return ch.Ack(last, true)
}

// recordedStatuses is, for Config.OnRecorded, the status the store kept
// for each recorded agent: its newest in the batch from the incarnation
// that holds its row.
func recordedStatuses(valid []pending, rec schema.Recorded) []RecordedStatus {
	newest := newestByAgent(valid)
	out := make([]RecordedStatus, 0, len(rec.Kept))
	for _, k := range rec.Kept {
		if st, ok := newest[k]; ok {
			out = append(out, RecordedStatus{AgentID: k.AgentID, Seq: st.Seq, AppliedEpoch: st.AppliedEpoch, DrainedEpoch: st.DrainedEpoch})
		}
	}
	return out
}

// newestByAgent maps each agent process (ID and incarnation) in the batch
// to its status with the highest seq: the one the store considers.
func newestByAgent(valid []pending) map[schema.StatusKey]wire.Status {
	newest := make(map[schema.StatusKey]wire.Status, len(valid))
	for _, p := range valid {
		k := schema.StatusKey{AgentID: p.status.AgentID, Incarnation: p.status.Incarnation}
		if cur, ok := newest[k]; !ok || p.status.Seq > cur.Seq {
			newest[k] = p.status
		}
	}
	return newest
}

// record writes the batch in one transaction. If the database refuses the
// batch's data (a value checkStorable did not foresee), it falls back to
// one status at a time, so one poisoned status cannot wedge every agent's
// heartbeat: the ones the database refuses are rejected, left out of the
// returned statuses, and acked with the batch.
func (l *leader) record(ctx context.Context, valid []pending) (kept []pending, rec schema.Recorded, err error) {
	statuses := make([]schema.Sent, len(valid))
	for i, p := range valid {
		statuses[i] = schema.Sent{Status: p.status, Principal: p.principal}
	}
	rec, err = l.recordStatuses(ctx, statuses)
	if err == nil || !isDataError(err) {
		return valid, rec, err
	}
	l.log.Warn().Err(err).Int("statuses", len(valid)).Msg("the database refused a batch of statuses; recording them one by one to find the bad ones")
	kept, rec = make([]pending, 0, len(valid)), schema.Recorded{}
	for i, p := range valid {
		one, err := l.recordStatuses(ctx, statuses[i:i+1])
		switch {
		case err == nil:
			kept = append(kept, p)
			rec.Epoch = max(rec.Epoch, one.Epoch)
			rec.Kept = append(rec.Kept, one.Kept...)
			rec.Conflicts = append(rec.Conflicts, one.Conflicts...)
			rec.Refused = append(rec.Refused, one.Refused...)
		case isDataError(err):
			l.rejected(p.delivery, RejectMalformed, err)
		default:
			return nil, schema.Recorded{}, err
		}
	}
	return kept, rec, nil
}

func (l *leader) recordStatuses(ctx context.Context, statuses []schema.Sent) (schema.Recorded, error) {
	octx, cancel := context.WithTimeout(ctx, dbTimeout)
	defer cancel()
	rec, err := l.b.cfg.Store.RecordSent(octx, statuses, l.b.cfg.LeaseDuration, l.b.cfg.Insecure)
	if err == nil {
		l.b.stats.statusBatches.Add(1)
		l.log.Debug().Int("statuses", len(statuses)).Int("recorded", len(rec.Kept)).Int("conflicts", len(rec.Conflicts)).
			Int64("epoch", rec.Epoch).Msg("status batch recorded")
	}
	return rec, err
}

// isDataError reports a refusal of the data itself (SQLSTATE class 22,
// data exception, or 23, integrity violation): sending it again cannot
// succeed.
func isDataError(err error) bool {
	var pqErr *pq.Error
	if !errors.As(err, &pqErr) {
		return false
	}
	class := pqErr.Code.Class()
	return class == "22" || class == "23"
}

// grant counts what the batch recorded and hands a grant for each kept
// status to the publisher: a status the store did not keep (a replay, or
// one from a second live process under the same ID) earns none, so its
// sender's lease is not extended. An agent's grant answers its newest
// status in the batch, the one the store kept.
func (l *leader) grant(valid []pending, rec schema.Recorded) {
	// Within a batch an agent's newest status supersedes its older ones
	// (the store keeps that one only): the older ones are neither stale
	// nor granted. Stale is a newest status the store refused as not newer.
	newest := newestByAgent(valid)
	l.b.stats.statusesRecorded.Add(int64(len(rec.Kept)))
	if n := len(rec.Conflicts); n > 0 {
		l.b.stats.reject(RejectIDConflict, int64(n))
		for _, k := range rec.Conflicts {
			st := newest[k]
			l.rejectLog.Warn().Str("agent_id", k.AgentID).Str("incarnation", k.Incarnation).Str("host", st.Host).Int("pid", st.PID).
				Msg("a second live process claims this agent ID: its status is not recorded and earns no grant")
		}
	}
	if n := len(rec.Refused); n > 0 {
		l.b.stats.reject(RejectUnauthenticated, int64(n))
		for _, r := range rec.Refused {
			st := newest[r.StatusKey]
			l.rejectLog.Warn().Str("agent_id", r.AgentID).Str("incarnation", r.Incarnation).Str("service", st.Service).
				Str("host", st.Host).Int("pid", st.PID).Str("reason", r.Reason).
				Msg("a status that does not prove who sent it changed nothing: not the token its agent's row is bound to, or a sender not allowed for its service ('phasecast agents allow'), or a seq too far ahead")
		}
	}
	if stale := len(newest) - len(rec.Kept) - len(rec.Conflicts) - len(rec.Refused); stale > 0 {
		l.b.stats.reject(RejectStaleSeq, int64(stale))
		l.log.Debug().Int("stale", stale).Msg("statuses not newer than the recorded ones were acked without a grant")
	}
	// An agent whose statuses in the batch all skip the grant (acks sent
	// on a fresh lease) gets none, unless it is behind the epoch, which
	// the grant would tell it.
	wanted := make(map[schema.StatusKey]bool, len(newest))
	for _, p := range valid {
		if p.status.WantsGrant(rec.Epoch) {
			wanted[schema.StatusKey{AgentID: p.status.AgentID, Incarnation: p.status.Incarnation}] = true
		}
	}
	grants := make([]outgoing, 0, len(rec.Kept))
	for _, k := range rec.Kept {
		st, ok := newest[k]
		if !ok || !wanted[k] {
			continue
		}
		delete(newest, k) // one grant per agent, even if recorded twice
		body, err := wire.EncodeGrant(wire.Grant{AgentID: k.AgentID, Incarnation: k.Incarnation, Seq: st.Seq,
			LeaseMS: l.b.cfg.LeaseDuration.Milliseconds(), Epoch: rec.Epoch})
		if err != nil {
			l.log.Error().Err(err).Str("agent_id", k.AgentID).Msg("encoding a grant failed")
			continue
		}
		grants = append(grants, outgoing{agentID: k.AgentID, msg: l.b.message(wire.KindGrant, body)})
	}
	if len(grants) == 0 {
		return
	}
	select {
	case l.grants <- grants:
	default:
		l.b.stats.grantsDropped.Add(int64(len(grants)))
		l.rejectLog.Warn().Int("grants", len(grants)).Msg("the publishing connection is behind; grants dropped (the agents' next statuses earn new ones)")
	}
}

// rejected counts and logs a status that will not be recorded.
func (l *leader) rejected(d amqp.Delivery, reason string, err error) {
	l.b.stats.reject(reason, 1)
	excerpt := d.Body
	if len(excerpt) > maxBodyExcerpt {
		excerpt = excerpt[:maxBodyExcerpt]
	}
	excerpt = wire.RedactToken(excerpt)
	ev := l.rejectLog.Warn().Err(err)
	if reason == RejectVersion {
		// An agent of another version: say which, so the operator knows
		// what to upgrade (README: upgrading).
		var who struct{ AgentID, Service, Host string }
		if json.Unmarshal(d.Body, &struct {
			AgentID *string `json:"agent_id"`
			Service *string `json:"service"`
			Host    *string `json:"host"`
		}{&who.AgentID, &who.Service, &who.Host}) == nil {
			ev = ev.Str("agent_id", who.AgentID).Str("service", who.Service).Str("host", who.Host)
		}
		ev = ev.Str("hint", "this broadcaster takes status v2 (per-agent tokens) only: upgrade the agent")
	}
	ev.Str("reason", reason).
		Int("size", len(d.Body)).
		Str("body_excerpt", string(excerpt)).
		Str("message_id", d.MessageId).
		Str("app_id", d.AppId).
		Str("user_id", d.UserId).
		Bool("redelivered", d.Redelivered).
		Msg("status rejected")
}

// decodeStatus authenticates and decodes one status, or says why not with
// one of the Reject… reasons.
func (b *Broadcaster) decodeStatus(d amqp.Delivery) (wire.Status, string, error) {
	if err := wire.CheckSize(d.Body); err != nil {
		return wire.Status{}, RejectTooLarge, err
	}
	if b.cfg.StatusMACKey != nil {
		var mac string
		switch v := d.Headers[wire.MACHeader].(type) {
		case nil:
		case string:
			mac = v
		case []byte:
			mac = string(v)
		default:
			return wire.Status{}, RejectBadSignature, fmt.Errorf("%w: header %s is a %T", wire.ErrBadSignature, wire.MACHeader, v)
		}
		if err := wire.CheckMAC(b.cfg.StatusMACKey, d.Body, mac); err != nil {
			return wire.Status{}, statusReason(err), err
		}
	}
	st, err := wire.DecodeStatus(d.Body)
	if err != nil {
		return st, statusReason(err), err
	}
	return b.checkBelongs(st, time.Now())
}

// checkBelongs drops a status that is not news from this store's agents:
// one that names another store (or none), or one sent longer ago than a
// lease. The store is checked first: an earlier run's status is counted as
// of another store however old it is.
func (b *Broadcaster) checkBelongs(st wire.Status, now time.Time) (wire.Status, string, error) {
	if own := *b.storeID.Load(); st.StoreID != own {
		return wire.Status{}, RejectOtherStore, fmt.Errorf("%w: status names store %q, this broadcaster's is %q", errOtherStore, st.StoreID, own)
	}
	// A clock behind the broadcaster's makes an agent's statuses look
	// older: one more than a lease behind has them all dropped, counted
	// and logged (README: the limits).
	if age := now.Sub(st.SentAt); age > b.cfg.LeaseDuration {
		return wire.Status{}, RejectExpired, fmt.Errorf("%w: sent %s ago (at %s), longer than the lease of %s", errExpired, age.Round(time.Millisecond), st.SentAt.Format(time.RFC3339Nano), b.cfg.LeaseDuration)
	}
	return st, "", nil
}

// statusReason is the reason a wire or MAC error rejects a status as. A
// status with impossible values counts as malformed (RejectMalformed):
// the broadcaster has no reason of its own for them.
func statusReason(err error) string {
	if reason := wire.Reason(err); reason != wire.ReasonInvalid {
		return reason
	}
	return RejectMalformed
}

var (
	errOtherStore = errors.New("status of another store")
	errExpired    = errors.New("status expired")
)
