package broadcaster

import (
	"sync/atomic"

	"github.com/phasecast/phasecast/internal/wire"
)

// Reasons a status message is rejected, the keys of Stats.Rejected.
const (
	// RejectMalformed: not JSON, wrong types, or values that cannot be
	// right or cannot be stored (no agent_id, drained ahead of applied, a
	// pid or seq out of range, a NUL byte, no incarnation or token).
	RejectMalformed = wire.ReasonMalformed
	// RejectVersion: a protocol version this build does not speak.
	RejectVersion = wire.ReasonVersion
	// RejectKind: a message of another kind (a state or a grant) on the
	// status queue.
	RejectKind = wire.ReasonKind
	// RejectTooLarge: a body over wire.MaxMessageSize.
	RejectTooLarge = wire.ReasonTooLarge
	// RejectUnsigned: StatusMACKey is set and the message carries no MAC.
	RejectUnsigned = wire.ReasonUnsigned
	// RejectBadSignature: the MAC does not match the body.
	RejectBadSignature = wire.ReasonBadSignature
	// RejectStaleSeq: a valid status whose seq is not newer than the one
	// recorded for its agent (a replay or a reordering). It is acked and
	// earns no grant. A status superseded by a newer one from the same
	// agent in the same batch is not counted: the newer one answers it.
	RejectStaleSeq = "stale_seq"
	// RejectOtherStore: a status that names another store than the
	// broadcaster's (schema.Store.ID), or none. The status queue is named
	// by the exchange prefix alone and is durable, so it may still hold
	// statuses of an earlier run against a store since dropped and
	// migrated again; agents of a build that predates store identities
	// name none.
	RejectOtherStore = "other_store"
	// RejectExpired: a status sent longer ago than the lease
	// (Config.LeaseDuration), by its sent_at: the lease it asks for would
	// already have run out, and its agent may be long gone.
	RejectExpired = "expired"
	// RejectIDConflict: a valid status from a second live process under
	// an agent ID whose row another process (incarnation) holds with a
	// live lease. It is acked, earns no grant, and the store marks the ID
	// conflicted (schema.Agent.Rivals) until one of the two stops.
	RejectIDConflict = "id_conflict"
	// RejectUnauthenticated: a status that changes nothing because it did
	// not prove who sent it: not the token its agent's row is bound to, or
	// a sender (its user_id) not allowed to enrol agents of its service
	// ('phasecast agents allow'), or a seq more than 2^40 ahead of its
	// row's. It is acked and earns no grant.
	RejectUnauthenticated = "unauthenticated"
)

var rejectReasons = []string{
	RejectMalformed, RejectVersion, RejectKind, RejectTooLarge,
	RejectUnsigned, RejectBadSignature, RejectStaleSeq, RejectOtherStore, RejectExpired, RejectIDConflict,
	RejectUnauthenticated,
}

// Stats is a snapshot of a broadcaster's counters since New. Counters of
// leader work only move while the broadcaster leads.
type Stats struct {
	// StatesPublished counts state messages the broker confirmed, beacons
	// included.
	StatesPublished int64
	// BeaconsPublished counts the confirmed states that were periodic
	// beacons rather than relays of a change.
	BeaconsPublished int64
	// StatusesRecorded counts statuses written to the store.
	StatusesRecorded int64
	// StatusBatches counts the transactions that recorded statuses.
	StatusBatches int64
	// GrantsSent counts grants handed to the broker.
	GrantsSent int64
	// GrantsDropped counts grants not sent because the publishing
	// connection was too far behind; the agents' next statuses earn new
	// ones.
	GrantsDropped int64
	// Rejected counts rejected status messages by reason (the Reject…
	// constants); every reason is present.
	Rejected map[string]int64
	// Takeovers counts the times this broadcaster became leader.
	Takeovers int64
	// StepDowns counts the times it stopped leading (lost the lock, or
	// Stop).
	StepDowns int64
}

type counters struct {
	statesPublished  atomic.Int64
	beaconsPublished atomic.Int64
	statusesRecorded atomic.Int64
	statusBatches    atomic.Int64
	grantsSent       atomic.Int64
	grantsDropped    atomic.Int64
	takeovers        atomic.Int64
	stepDowns        atomic.Int64
	rejected         map[string]*atomic.Int64 // fixed keys: read without a lock
}

func newCounters() *counters {
	c := &counters{rejected: make(map[string]*atomic.Int64, len(rejectReasons))}
	for _, r := range rejectReasons {
		c.rejected[r] = new(atomic.Int64)
	}
	return c
}

func (c *counters) reject(reason string, n int64) { c.rejected[reason].Add(n) }

func (c *counters) snapshot() Stats {
	s := Stats{
		StatesPublished:  c.statesPublished.Load(),
		BeaconsPublished: c.beaconsPublished.Load(),
		StatusesRecorded: c.statusesRecorded.Load(),
		StatusBatches:    c.statusBatches.Load(),
		GrantsSent:       c.grantsSent.Load(),
		GrantsDropped:    c.grantsDropped.Load(),
		Takeovers:        c.takeovers.Load(),
		StepDowns:        c.stepDowns.Load(),
		Rejected:         make(map[string]int64, len(c.rejected)),
	}
	for r, n := range c.rejected {
		s.Rejected[r] = n.Load()
	}
	return s
}
