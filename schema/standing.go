package schema

import (
	"context"
	"database/sql"
	"time"

	"github.com/phasecast/phasecast/internal/phase"
)

// Agent standings: what an agent's row says of it, as 'phasecast status
// --watch' shows it and the broadcaster's metrics count it. The lease
// standings (live, fenced, expired) hold for any agent; the others are
// its part in one release's pending contract.
const (
	StandingLive     = "live"         // its lease has not run out
	StandingFenced   = "fenced"       // lease ran out lately without a goodbye: it fenced itself
	StandingExpired  = "expired"      // said goodbye, or its lease ran out long ago
	StandingAcked    = "acknowledged" // drained the contract epoch; counts
	StandingDraining = "draining"     // applied it, guards begun before it still open
	StandingBehind   = "behind"       // has not applied the contract epoch yet
	StandingOldCode  = "old code"     // its code predates the release: never counts
)

// FencedFor is how long after its lease ran out, without a goodbye, an
// agent counts as fenced (its process may well run on, fenced, trying to
// re-sync) rather than expired.
const FencedFor = time.Minute

// LeaseStanding is the agent's standing from its lease alone:
// StandingLive, StandingFenced or StandingExpired.
func (a *Agent) LeaseStanding() string {
	if a.Live() {
		return StandingLive
	}
	goodbye := !a.LeaseExpiresAt.After(a.LastSeen) // a goodbye ends the lease as it is recorded
	if !goodbye && -time.Duration(a.LeaseRemainingMS)*time.Millisecond < FencedFor {
		return StandingFenced
	}
	return StandingExpired
}

// PendingContract reports whether a release's contract is under way: in
// contract or contracting, where agents' acknowledgements matter.
func (r *ReleaseStatus) PendingContract() bool {
	return r.ContractEpoch != nil && (r.Phase == phase.Contract || r.Phase == phase.Contracting)
}

// StandingIn is the agent's part in release r's pending contract
// (r.PendingContract): a lease standing other than live, else old code,
// acknowledged, draining or behind.
func (a *Agent) StandingIn(r ReleaseStatus) string {
	if s := a.LeaseStanding(); s != StandingLive {
		return s
	}
	epoch := *r.ContractEpoch
	switch {
	case !a.Knows(r.Name):
		return StandingOldCode
	case a.Acked(r.Name, epoch):
		return StandingAcked
	case a.AppliedEpoch >= epoch:
		return StandingDraining
	default:
		return StandingBehind
	}
}

// Convergence is how far the live agents have come on one flip, read on
// the database clock.
type Convergence struct {
	Live int       // agents with a live lease
	Done int       // of those, the ones that acknowledged (or drained) the flip
	Now  time.Time // the database's now()
}

// Converged reports whether every live agent, and at least one, is done.
func (c Convergence) Converged() bool { return c.Live > 0 && c.Done == c.Live }

// CountConverged counts, in one query, the live agents and those done
// with the flip at epoch: for a flip to contract of release (release
// non-empty), the ones that acknowledged it (Acked); for any other flip
// (release empty), the ones that drained epoch.
func (s *Store) CountConverged(ctx context.Context, release string, epoch int64) (Convergence, error) {
	var c Convergence
	err := s.db.QueryRowContext(ctx, s.sql(`SELECT count(*),
		count(*) FILTER (WHERE CASE WHEN $1 = '' THEN drained_epoch >= $2 ELSE `+ackedWhere+` END), now()
		FROM @schema.agents WHERE lease_expires_at > now()`), release, epoch).Scan(&c.Live, &c.Done, &c.Now)
	return c, notMigrated(err)
}

// UnpublishedEvents returns the outbox rows up to epoch not yet marked
// published, oldest first: the flips a state at epoch is about to
// announce, with the time each committed (CreatedAt, the database clock).
func (s *Store) UnpublishedEvents(ctx context.Context, upTo int64) ([]Event, error) {
	var evs []Event
	err := s.db.SelectContext(ctx, &evs, s.sql(`SELECT epoch, release, from_phase, to_phase, created_at, published_at
		FROM @schema.events WHERE published_at IS NULL AND epoch <= $1 ORDER BY epoch`), upTo)
	return evs, notMigrated(err)
}

// OutboxLag is how many epochs the newest unpublished outbox row is ahead
// of the newest published one: 0 when the outbox is drained.
func (s *Store) OutboxLag(ctx context.Context) (int64, error) {
	var unpublished, published sql.NullInt64
	err := s.db.QueryRowContext(ctx, s.sql(`SELECT (SELECT max(epoch) FROM @schema.events WHERE published_at IS NULL),
		(SELECT max(epoch) FROM @schema.events WHERE published_at IS NOT NULL)`)).Scan(&unpublished, &published)
	if err != nil || !unpublished.Valid {
		return 0, notMigrated(err)
	}
	return unpublished.Int64 - published.Int64, nil
}
