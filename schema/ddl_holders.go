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
	Age time.Duration `json:"age"`
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
	}
	if err := sqlx.SelectContext(ctx, q, &rows, `
		SELECT l.pid, coalesce(a.application_name, '') AS application_name, coalesce(a.state, '') AS state,
		       l.relation::regclass::text AS relation, l.mode,
		       (extract(epoch FROM clock_timestamp() - a.xact_start) * 1000)::int8 AS age_ms
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
		h := LockHolder{PID: int(r.PID.Int64), ApplicationName: r.ApplicationName, State: r.State, Relation: r.Relation, Mode: r.Mode, Age: -1}
		if r.AgeMS.Valid {
			h.Age = time.Duration(r.AgeMS.Int64) * time.Millisecond
		}
		holders[i] = h
	}
	return holders, nil
}

// oldHolder returns the oldest of holders whose transaction has been open
// for at least threshold, or of unknown age. Such a transaction is not
// likely to end within a lock_timeout of threshold (one open for a while
// tends to stay open about as long again), so a try would only queue in
// front of live traffic and fail.
func oldHolder(holders []LockHolder, threshold time.Duration) (LockHolder, bool) {
	for _, h := range holders { // oldest first
		if h.Age < 0 || h.Age >= threshold {
			return h, true
		}
	}
	return LockHolder{}, false
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
