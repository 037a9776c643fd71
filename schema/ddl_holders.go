package schema

import (
	"context"
	"database/sql"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"
)

// LockHolder is another session's granted lock on a relation the DROP must
// lock. ACCESS EXCLUSIVE conflicts with every lock mode, so each one holds
// the DROP up until its transaction ends.
type LockHolder struct {
	PID             int    `json:"pid"` // 0 for a prepared transaction
	ApplicationName string `json:"application_name,omitempty"`
	State           string `json:"state,omitempty"`
	Relation        string `json:"relation"`
	Mode            string `json:"mode"`
	// Age is how long its transaction has been open; -1 when unknown (a
	// prepared transaction, a session outside a transaction), which counts
	// as old.
	Age       time.Duration `json:"age"`
	xactStart time.Time     // with PID, tells one transaction from the next
}

func (h LockHolder) String() string {
	age := "of unknown age"
	if h.Age >= 0 {
		age = "open for " + h.Age.Round(time.Millisecond).String()
	}
	if h.PID == 0 {
		return fmt.Sprintf("a prepared transaction (%s on %s, %s)", h.Mode, h.Relation, age)
	}
	return fmt.Sprintf("pid %d (application_name %q, %s, %s on %s, transaction %s)", h.PID, h.ApplicationName, h.State, h.Mode, h.Relation, age)
}

// lockHolders lists the granted locks other sessions hold on rels (quoted
// relation names; ones that do not exist are skipped), oldest transaction
// first. It reads pg_locks, which costs about as much as the locks held in
// the cluster, and takes no lock itself.
func lockHolders(ctx context.Context, q sqlx.QueryerContext, rels []string) ([]LockHolder, error) {
	var rows []struct {
		PID             sql.NullInt64 `db:"pid"`
		ApplicationName string        `db:"application_name"`
		State           string        `db:"state"`
		Relation        string        `db:"relation"`
		Mode            string        `db:"mode"`
		AgeMS           sql.NullInt64 `db:"age_ms"`
		XactStart       sql.NullTime  `db:"xact_start"`
	}
	if err := sqlx.SelectContext(ctx, q, &rows, `
		SELECT l.pid, coalesce(a.application_name, '') AS application_name, coalesce(a.state, '') AS state,
		       l.relation::regclass::text AS relation, l.mode,
		       (extract(epoch FROM clock_timestamp() - a.xact_start) * 1000)::int8 AS age_ms, a.xact_start
		FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
		WHERE l.locktype = 'relation' AND l.granted
		  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
		  AND l.relation = ANY (ARRAY(SELECT to_regclass(n)::oid FROM unnest($1::text[]) n))
		  AND l.pid IS DISTINCT FROM pg_backend_pid()
		ORDER BY a.xact_start NULLS FIRST, l.pid`, pq.Array(rels)); err != nil {
		return nil, fmt.Errorf("reading pg_locks: %w", err)
	}
	holders := make([]LockHolder, len(rows))
	for i, r := range rows {
		h := LockHolder{PID: int(r.PID.Int64), ApplicationName: r.ApplicationName, State: r.State, Relation: r.Relation, Mode: r.Mode, Age: -1, xactStart: r.XactStart.Time}
		if r.AgeMS.Valid {
			h.Age = time.Duration(r.AgeMS.Int64) * time.Millisecond
		}
		holders[i] = h
	}
	return holders, nil
}

// lockPacer decides, look by look at the holders of the locks a statement
// needs, whether to try and with which lock_timeout. It tries when every
// holder is younger than the current lock_timeout: a transaction open
// longer is not likely to end within it (one open for a while tends to
// stay open about as long again), so a try would only queue in front of
// live traffic and fail. It lengthens the lock_timeout, doubling up to
// ceiling, when the holders are a stream that keeps the table locked: after
// starveTries tries in a row timed out, or once streamEnds of the old
// holders it held off for have ended while others took their place. A
// single long transaction never ends while it holds off, so it never
// lengthens it.
type lockPacer struct {
	lockTimeout, ceiling time.Duration
	failed               int                   // tries in a row that timed out
	old                  map[lockXact]struct{} // old holders seen since the last try or lengthening
	ended                int                   // of those, how many have ended
}

// lockXact is one holder's transaction.
type lockXact struct {
	pid   int
	start time.Time
}

const (
	// starveTries: tries in a row that timed out before the lock_timeout
	// doubles.
	starveTries = 4
	// streamEnds: old holders that ended while the runner held off, with
	// others in their place, before the lock_timeout doubles.
	streamEnds = 3
	// lockTimeoutCeiling bounds the doubling (at least LockTimeout): the
	// old default, so a stream never makes a read stall longer than it
	// did before the runner looked first.
	lockTimeoutCeiling = 2 * time.Second
)

func newLockPacer(lockTimeout time.Duration) *lockPacer {
	return &lockPacer{lockTimeout: lockTimeout, ceiling: max(lockTimeout, lockTimeoutCeiling), old: map[lockXact]struct{}{}}
}

// look takes the holders now there (oldest first) and returns the oldest
// old one to hold off for, if any. lengthened reports that this look
// doubled the lock_timeout.
func (p *lockPacer) look(holders []LockHolder) (hold LockHolder, holdOff, lengthened bool) {
	present := make(map[lockXact]bool, len(holders))
	for _, h := range holders {
		present[lockXact{h.PID, h.xactStart}] = true
	}
	for x := range p.old {
		if !present[x] {
			delete(p.old, x)
			p.ended++
		}
	}
	if p.ended >= streamEnds {
		lengthened = p.lengthen()
	}
	for _, h := range holders {
		if h.Age < 0 || h.Age >= p.lockTimeout {
			if !holdOff {
				hold, holdOff = h, true
			}
			p.old[lockXact{h.PID, h.xactStart}] = struct{}{}
		}
	}
	if holdOff {
		p.failed = 0
	}
	return hold, holdOff, lengthened
}

// timedOut counts a try that timed out; lengthened reports that it
// doubled the lock_timeout.
func (p *lockPacer) timedOut() (lengthened bool) {
	p.failed++
	if p.failed >= starveTries {
		return p.lengthen()
	}
	return false
}

func (p *lockPacer) lengthen() bool {
	p.failed, p.ended = 0, 0
	clear(p.old)
	if p.lockTimeout >= p.ceiling {
		return false
	}
	p.lockTimeout = min(2*p.lockTimeout, p.ceiling)
	return true
}

// Pacing of the DDL's looks at pg_locks while an old holder is there.
const (
	holdOffPollMin = 10 * time.Millisecond
	holdOffPollMax = 50 * time.Millisecond
)

// holdOffPoll returns how long to wait before the next look: jittered, so
// looks do not line up with a periodic job.
func holdOffPoll() time.Duration {
	return holdOffPollMin + rand.N(holdOffPollMax-holdOffPollMin+1)
}
