package agent

import (
	"sync/atomic"
	"time"

	"github.com/phasecast/phasecast/internal/wire"
)

// Reasons a message is rejected, the keys of Stats.RejectedMessages.
const (
	RejectTooLarge     = wire.ReasonTooLarge     // over wire.MaxMessageSize
	RejectMalformed    = wire.ReasonMalformed    // not JSON, or a field of the wrong type
	RejectVersion      = wire.ReasonVersion      // a protocol version this build does not speak
	RejectKind         = wire.ReasonKind         // neither a state nor a grant
	RejectInvalid      = wire.ReasonInvalid      // well-formed but impossible (negative epoch, unknown phase, …)
	RejectUnsigned     = wire.ReasonUnsigned     // Config.StateKey is set and the message has no signature
	RejectBadSignature = wire.ReasonBadSignature // the signature does not match the body
	RejectWrongAgent   = "wrong_agent"           // a grant for another agent
	RejectUnknownSeq   = "unknown_seq"           // a grant for a status this agent did not send (or too old to remember)
	RejectUnconfirmed  = "unconfirmed"           // with a DB: a state epoch the store does not confirm (forged, or another store)
)

var rejectReasons = [...]string{
	RejectTooLarge, RejectMalformed, RejectVersion, RejectKind, RejectInvalid,
	RejectUnsigned, RejectBadSignature, RejectWrongAgent, RejectUnknownSeq, RejectUnconfirmed,
}

type rejectReason int

const (
	rejTooLarge rejectReason = iota
	rejMalformed
	rejVersion
	rejKind
	rejInvalid
	rejUnsigned
	rejBadSignature
	rejWrongAgent
	rejUnknownSeq
	rejUnconfirmed
)

func (r rejectReason) String() string { return rejectReasons[r] }

// reasonFor is the reason a wire or signature error is counted as.
func reasonFor(err error) rejectReason {
	name := wire.Reason(err)
	for r, n := range rejectReasons {
		if n == name {
			return rejectReason(r)
		}
	}
	return rejMalformed
}

// counters are the agent's monotonic counts.
type counters struct {
	rejected       [len(rejectReasons)]atomic.Int64
	staleRefusals  atomic.Int64
	ignoredStates  atomic.Int64
	behindGrants   atomic.Int64
	resyncs        atomic.Int64
	resyncFailures atomic.Int64
	digestConfirms atomic.Int64
	signedStates   atomic.Int64
	reconnects     atomic.Int64
	fencings       atomic.Int64
	ignoredSyncs   atomic.Int64
	ackDelays      delayHistogram

	unconfirmedStatuses atomic.Int64 // statuses the broker did not confirm
}

// AckDelayBuckets are the upper bounds of Stats.AckDelays' buckets.
var AckDelayBuckets = []time.Duration{
	time.Millisecond, 2500 * time.Microsecond, 5 * time.Millisecond, 10 * time.Millisecond, 25 * time.Millisecond,
	50 * time.Millisecond, 100 * time.Millisecond, 250 * time.Millisecond, 500 * time.Millisecond,
	time.Second, 2500 * time.Millisecond, 5 * time.Second, 10 * time.Second, 30 * time.Second, time.Minute, 5 * time.Minute,
}

// DelayHistogram is a histogram of durations.
type DelayHistogram struct {
	Count uint64
	Sum   time.Duration
	// Buckets[i] counts the durations up to AckDelayBuckets[i]
	// (cumulative, as Prometheus has it).
	Buckets []uint64
}

// delayHistogram observes once per acknowledged epoch: a few atomics,
// far from Enter and Exit.
type delayHistogram struct {
	count   atomic.Uint64
	sumNS   atomic.Int64
	buckets [16]atomic.Uint64 // per AckDelayBuckets, not cumulative
}

func (h *delayHistogram) observe(d time.Duration) {
	for i, b := range AckDelayBuckets {
		if d <= b {
			h.buckets[i].Add(1)
			break
		}
	}
	h.sumNS.Add(int64(d))
	h.count.Add(1)
}

// snapshot reads the histogram; under concurrent observes the buckets may
// trail the count by the observations in flight.
func (h *delayHistogram) snapshot() DelayHistogram {
	out := DelayHistogram{Count: h.count.Load(), Sum: time.Duration(h.sumNS.Load()), Buckets: make([]uint64, len(AckDelayBuckets))}
	var cum uint64
	for i := range AckDelayBuckets {
		cum += h.buckets[i].Load()
		out.Buckets[i] = min(cum, out.Count)
	}
	return out
}

// Stats is a point-in-time view of an agent, for metrics and tests.
type Stats struct {
	// AppliedEpoch is the epoch of the current snapshot (-1 before any).
	AppliedEpoch int64
	// DrainedEpoch is the newest epoch acknowledged: no guard pinned to an
	// older snapshot was still open when it was set (-1 before any).
	DrainedEpoch int64
	// Inflight counts guards still pinned to snapshots older than the
	// current one.
	Inflight int64
	// Fenced is true while the local lease has run out (and before Start).
	Fenced bool
	// LeaseRemaining is the time left on the local lease; negative once it
	// ran out.
	LeaseRemaining time.Duration
	// StatusesSent counts statuses sent, over AMQP or through the store;
	// Seq is the seq of the last one. Seqs start at the agent's creation
	// time in nanoseconds; the store orders them within this process's
	// incarnation only.
	StatusesSent, Seq uint64
	// StaleRefusals counts Enter calls refused with ErrStale.
	StaleRefusals int64
	// RejectedMessages counts dropped messages by reason (the Reject…
	// constants); reasons never seen are absent.
	RejectedMessages map[string]int64
	// IgnoredStates counts valid state messages not newer than the
	// snapshot held: duplicates, reorderings and beacons.
	IgnoredStates int64
	// BehindGrants counts grants that carried an epoch newer than the
	// snapshot held, which therefore did not extend the lease.
	BehindGrants int64
	// Resyncs counts successful reads of the store (Store.SyncAgent);
	// ResyncFailures the failed ones.
	Resyncs, ResyncFailures int64
	// DigestConfirms counts state messages confirmed by the store's digest
	// of its state (one row read) and applied as they came; the others
	// were confirmed by reading the whole state, counted in Resyncs.
	DigestConfirms int64
	// SignedStates counts state messages an agent with a DB applied on
	// the broadcaster's signature, without reading the store
	// (Config.ConfirmSignedStates says why that is the store's word).
	SignedStates int64
	// Reconnects counts AMQP sessions after the first.
	Reconnects int64
	// UnconfirmedStatuses counts statuses the broker nacked, returned as
	// unroutable or did not confirm within Config.StatusConfirmTimeout;
	// each dropped the connection, and the next one's first status
	// carried the state again.
	UnconfirmedStatuses int64
	// Fencings counts the times the lease ran out.
	Fencings int64
	// StoreID is the identity of the store the agent's statuses name:
	// read from the store with a DB, else learnt from the states. Empty
	// until the agent holds a state.
	StoreID string
	// StatusesIgnored counts syncs through the store that the store did
	// not record (schema.ErrStatusIgnored), most often because another
	// live process holds this agent's ID; none extended the lease.
	StatusesIgnored int64
	// AckDelays is the time from applying a state (its arrival, once
	// checked) to sending its acknowledgement, one observation per
	// acknowledged epoch; the state loaded by Start is not counted.
	AckDelays DelayHistogram
}
