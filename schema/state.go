package schema

import (
	"context"
	"database/sql"
	"encoding/json"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"

	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/wire"
)

// stateQuery returns each release with its removals as JSON, in one round
// trip. Removals keep the manifest's spelling of the table
// ("nova.instances"), which is how services name it.
const stateQuery = `
SELECT r.name, r.phase,
       COALESCE(json_agg(json_build_object(
           'table', CASE WHEN rm.table_schema = '' THEN rm.table_name ELSE rm.table_schema || '.' || rm.table_name END,
           'columns', rm.columns) ORDER BY rm.ordinal) FILTER (WHERE rm.release IS NOT NULL), '[]')
FROM @schema.releases r
LEFT JOIN @schema.removals rm ON rm.release = r.name
GROUP BY r.name, r.phase
ORDER BY r.name`

// stateSnapshotQuery is stateQuery with the epoch on every row (and one
// row with no release when there is none). One statement reads one
// snapshot, so the releases match the epoch without a transaction. The
// epoch is a scalar subquery and the releases are joined to a one-row
// relation: a join of the epoch table with them multiplied the planner's
// default row estimates of never-analysed tables past jit_above_cost, and
// JIT compilation took milliseconds per read.
const stateSnapshotQuery = `
SELECT (SELECT value FROM @schema.epoch), (` + storeIDQuery + `), r.name, r.phase, r.removals
FROM (SELECT) AS one
LEFT JOIN (` + stateQuery + `) AS r(name, phase, removals) ON true
ORDER BY r.name`

// State returns the whole current state. It is one statement, so it reads
// one snapshot and the releases match the epoch, in one round trip; it
// takes no lock and writes no WAL, so it costs no commit flush on the
// broadcaster's or an agent's path to an acknowledgement. (A read-only
// transaction gave the same snapshot in four round trips, and the
// broadcaster reads it for every flip it relays.)
func (s *Store) State(ctx context.Context) (wire.State, error) {
	return s.state(ctx, s.db)
}

// state reads the whole state through q: the pool, or a transaction that
// wants to see its own writes.
func (s *Store) state(ctx context.Context, q sqlx.QueryerContext) (wire.State, error) {
	st := wire.State{V: wire.Version, Kind: wire.KindState, Releases: []wire.Release{}}
	rows, err := q.QueryContext(ctx, s.sql(stateSnapshotQuery))
	if err != nil {
		return st, notMigrated(err)
	}
	defer rows.Close()
	for rows.Next() {
		var name, ph sql.NullString
		var removals []byte
		if err := rows.Scan(&st.Epoch, &st.StoreID, &name, &ph, &removals); err != nil {
			return st, err
		}
		if !name.Valid {
			continue // no release yet
		}
		r, err := release(name.String, ph.String, removals)
		if err != nil {
			return st, err
		}
		st.Releases = append(st.Releases, r)
	}
	return st, notMigrated(rows.Err())
}

// release builds one release of a state from a row of stateQuery.
func release(name, ph string, removals []byte) (wire.Release, error) {
	r := wire.Release{Name: name, Phase: phase.Phase(ph)}
	if err := json.Unmarshal(removals, &r.Removals); err != nil {
		return r, err
	}
	for i := range r.Removals {
		if len(r.Removals[i].Columns) == 0 {
			r.Removals[i].Columns = nil
		}
	}
	if len(r.Removals) == 0 {
		r.Removals = nil
	}
	return r, nil
}

// epochQuery reads the global epoch.
const epochQuery = `SELECT value FROM @schema.epoch`

// storeIDQuery reads the store's identity, which migration 003 created and
// nothing changes.
const storeIDQuery = `SELECT store_id FROM @schema.store_identity`

// ID returns the store's identity: a random id created once, when the
// store was migrated to it, and never changed. The broadcaster sends it in
// every state and drops statuses that name another store, such as an
// earlier run's still in the status queue.
func (s *Store) ID(ctx context.Context) (string, error) {
	var id string
	err := s.db.GetContext(ctx, &id, s.sql(storeIDQuery))
	return id, notMigrated(err)
}

// lockedEpoch reads the epoch (and the store's identity) and holds the
// epoch row FOR SHARE until the transaction ends: no change can commit
// meanwhile, and a change that commits afterwards is ordered after this
// transaction's writes.
//
// Every flip waits for that lock, so a client that stops in the middle of
// such a transaction (a service syncing through the store, frozen by
// SIGSTOP, a debugger or a paused VM) would block every flip until it
// resumed. (The broadcaster records statuses in one statement, which no
// client can leave idle: recordStatusesQuery.) The
// transaction's own idle_in_transaction_session_timeout (set in the same
// statement, to cost no round trip) ends such a session, and its lock,
// after 10 s of silence; these transactions take milliseconds.
const lockedEpoch = `SELECT value, (` + storeIDQuery + `) FROM @schema.epoch
	WHERE set_config('idle_in_transaction_session_timeout', '` + lockHoldLimitMS + `', true) IS NOT NULL
	FOR SHARE`

// lockHoldLimitMS is how long, in milliseconds, a transaction holding the
// epoch row may sit idle before the server ends its session.
const lockHoldLimitMS = "10000"

// readState reads the epoch, holding its row FOR SHARE (lockedEpoch), and
// the store's identity, then the releases.
func (s *Store) readState(ctx context.Context, tx *sqlx.Tx) (wire.State, error) {
	st := wire.State{V: wire.Version, Kind: wire.KindState, Releases: []wire.Release{}}
	if err := tx.QueryRowxContext(ctx, s.sql(lockedEpoch)).Scan(&st.Epoch, &st.StoreID); err != nil {
		return st, err
	}
	rows, err := tx.QueryContext(ctx, s.sql(stateQuery))
	if err != nil {
		return st, err
	}
	defer rows.Close()
	for rows.Next() {
		var name, ph string
		var removals []byte
		if err := rows.Scan(&name, &ph, &removals); err != nil {
			return st, err
		}
		r, err := release(name, ph, removals)
		if err != nil {
			return st, err
		}
		st.Releases = append(st.Releases, r)
	}
	return st, rows.Err()
}

// StateDigest returns the digest of the current state
// (wire.State.Digest), as the last change wrote it: one primary-key read.
// It is empty when no change has written one yet. The digest covers the
// epoch, so a digest written before a change made without one matches no
// state message.
func (s *Store) StateDigest(ctx context.Context) (string, error) {
	var d sql.NullString
	err := s.db.GetContext(ctx, &d, s.sql(`SELECT state_digest FROM @schema.epoch`))
	return d.String, notMigrated(err)
}

// sealState writes the digest of the state as tx sees it, after the
// change's own writes: the last write of every change.
func (s *Store) sealState(ctx context.Context, tx *sqlx.Tx) error {
	st, err := s.state(ctx, tx)
	if err != nil {
		return err
	}
	_, err = tx.ExecContext(ctx, s.sql(`UPDATE @schema.epoch SET state_digest = $1`), st.Digest())
	return err
}

// Epoch returns the current epoch.
func (s *Store) Epoch(ctx context.Context) (int64, error) {
	var e int64
	err := s.db.GetContext(ctx, &e, s.sql(epochQuery))
	return e, notMigrated(err)
}

// upsertAgents records statuses and extends each agent's lease to the
// database's now() + lease, or ends it now for a goodbye (leaving). A
// status whose seq is not newer than the one recorded (a replay or a
// reordering) is ignored. It returns the ids it recorded.
const upsertAgents = `
INSERT INTO @schema.agents AS a (id, service, host, pid, version, releases, app_name, seq,
    applied_epoch, drained_epoch, inflight, last_seen, lease_expires_at)
SELECT x.agent_id, x.service, x.host, x.pid, x.version,
       ARRAY(SELECT jsonb_array_elements_text(COALESCE(x.releases, '[]'))), COALESCE(x.app_name, ''), x.seq,
       x.applied_epoch, x.drained_epoch, x.inflight, now(),
       CASE WHEN x.leaving THEN now() ELSE now() + $2 * interval '1 millisecond' END
FROM jsonb_to_recordset($1::jsonb) AS x(agent_id text, service text, host text, pid int, version text,
    releases jsonb, app_name text, seq bigint, applied_epoch bigint, drained_epoch bigint, inflight bigint,
    leaving boolean)
ON CONFLICT (id) DO UPDATE SET
    service = EXCLUDED.service, host = EXCLUDED.host, pid = EXCLUDED.pid, version = EXCLUDED.version,
    releases = EXCLUDED.releases, app_name = EXCLUDED.app_name, seq = EXCLUDED.seq,
    applied_epoch = EXCLUDED.applied_epoch, drained_epoch = EXCLUDED.drained_epoch,
    inflight = EXCLUDED.inflight, last_seen = EXCLUDED.last_seen, lease_expires_at = EXCLUDED.lease_expires_at
WHERE a.seq < EXCLUDED.seq
RETURNING a.id`

// jsonParam passes encoded JSON as a query parameter. A string goes in
// text format whatever lib/pq's binary_parameters says, and the server
// parses it for $1::jsonb; a []byte would go in binary format under
// binary_parameters=yes (which lib/pq needs behind a transaction pooler)
// and jsonb's binary input would reject it ("unsupported jsonb version
// number").
func jsonParam(b []byte) string { return string(b) }

// RecordStatuses records a batch of agent statuses in one transaction and
// returns the epoch current at that moment and the ids recorded (replayed
// or stale statuses are left out). Holding the epoch row FOR SHARE orders
// the write against flips: a flip that commits after this batch is seen by
// a runner that also sees these leases, and a flip that committed before it
// is in the returned epoch, which the grants carry.
func (s *Store) RecordStatuses(ctx context.Context, statuses []wire.Status, lease time.Duration) (epoch int64, recorded []string, err error) {
	if len(statuses) == 0 {
		return 0, nil, nil
	}
	// ON CONFLICT cannot touch a row twice in one statement: keep each
	// agent's newest status only.
	newest := make(map[string]int, len(statuses))
	batch := make([]wire.Status, 0, len(statuses))
	for _, st := range statuses {
		if i, ok := newest[st.AgentID]; ok {
			if st.Seq > batch[i].Seq {
				batch[i] = st
			}
			continue
		}
		newest[st.AgentID] = len(batch)
		batch = append(batch, st)
	}
	payload, err := json.Marshal(batch)
	if err != nil {
		return 0, nil, err
	}
	var ids pq.StringArray
	err = s.db.QueryRowContext(ctx, s.sql(recordStatusesQuery), jsonParam(payload), lease.Milliseconds()).Scan(&epoch, &ids)
	return epoch, ids, notMigrated(err)
}

// recordStatusesQuery is upsertAgents and the epoch read FOR SHARE in one
// statement, so its own transaction: one round trip and one plan per batch
// instead of four round trips, which matters for the heartbeats that
// arrive one or two at a time. The lock is held until the statement
// commits, whichever part runs first, which is all the ordering against
// flips needs; and no client can leave it idle in a transaction.
const recordStatusesQuery = `
WITH locked AS (SELECT value FROM @schema.epoch FOR SHARE),
     recorded AS (` + upsertAgents + `)
SELECT (SELECT value FROM locked), ARRAY(SELECT id FROM recorded)`

// SyncAgent is an agent's path to the truth without the broker: in one
// transaction it records the agent's status with a fresh lease and reads
// the whole state. An agent that is fenced, or that must confirm a state
// message, calls it. Because the lease and the read commit together under
// the epoch row lock, a runner either sees this lease and waits for the
// agent, or the agent reads the flip the runner acts on.
func (s *Store) SyncAgent(ctx context.Context, st wire.Status, lease time.Duration) (wire.State, error) {
	var state wire.State
	payload, err := json.Marshal([]wire.Status{st})
	if err != nil {
		return state, err
	}
	err = s.inTx(ctx, func(tx *sqlx.Tx) error {
		var err error
		if state, err = s.readState(ctx, tx); err != nil {
			return err
		}
		var recorded []string
		return tx.SelectContext(ctx, &recorded, s.sql(upsertAgents), jsonParam(payload), lease.Milliseconds())
	})
	return state, err
}

// Event is one outbox row.
type Event struct {
	Epoch     int64        `db:"epoch" json:"epoch"`
	Release   string       `db:"release" json:"release"`
	FromPhase *string      `db:"from_phase" json:"from,omitempty"`
	ToPhase   string       `db:"to_phase" json:"to"`
	CreatedAt time.Time    `db:"created_at" json:"created_at"`
	Published sql.NullTime `db:"published_at" json:"-"`
}

// unpublishedQuery reads the highest epoch in the outbox not yet marked
// published, NULL when everything is published.
const unpublishedQuery = `SELECT max(epoch) FROM @schema.events WHERE published_at IS NULL`

// UnpublishedEpoch returns the highest epoch in the outbox not yet marked
// published, or 0 when everything is published.
func (s *Store) UnpublishedEpoch(ctx context.Context) (int64, error) {
	var e sql.NullInt64
	err := s.db.GetContext(ctx, &e, s.sql(unpublishedQuery))
	return e.Int64, notMigrated(err)
}

// MarkPublished marks every outbox row up to epoch as published. The
// broadcaster calls it only after the broker confirmed a state at epoch.
func (s *Store) MarkPublished(ctx context.Context, epoch int64) error {
	_, err := s.db.ExecContext(ctx, s.sql(`UPDATE @schema.events SET published_at = now() WHERE epoch <= $1 AND published_at IS NULL`), epoch)
	return notMigrated(err)
}

// Broadcaster is one broadcaster's liveness row.
type Broadcaster struct {
	ID        string    `db:"id" json:"id"`
	Host      string    `db:"host" json:"host"`
	PID       int       `db:"pid" json:"pid"`
	Leader    bool      `db:"leader" json:"leader"`
	StartedAt time.Time `db:"started_at" json:"started_at"`
	LastSeen  time.Time `db:"last_seen" json:"last_seen"`
}

// TouchBroadcaster records that a broadcaster is alive, and whether it
// leads.
func (s *Store) TouchBroadcaster(ctx context.Context, b Broadcaster) error {
	_, err := s.db.ExecContext(ctx, s.sql(`
		INSERT INTO @schema.broadcasters (id, host, pid, leader, last_seen) VALUES ($1, $2, $3, $4, now())
		ON CONFLICT (id) DO UPDATE SET leader = $4, last_seen = now()`), b.ID, b.Host, b.PID, b.Leader)
	return notMigrated(err)
}

// RemoveBroadcaster deletes a broadcaster's row on a clean shutdown.
func (s *Store) RemoveBroadcaster(ctx context.Context, id string) error {
	_, err := s.db.ExecContext(ctx, s.sql(`DELETE FROM @schema.broadcasters WHERE id = $1`), id)
	return notMigrated(err)
}

// LeaderAliveWithin reports whether a leading broadcaster wrote its
// liveness within d, on the database clock.
func (s *Store) LeaderAliveWithin(ctx context.Context, d time.Duration) (bool, error) {
	return s.broadcasterAliveWithin(ctx, d, true)
}

// broadcasterAliveWithin reports whether a broadcaster (a leading one, if
// leaderOnly) wrote its liveness within d, on the database clock.
func (s *Store) broadcasterAliveWithin(ctx context.Context, d time.Duration, leaderOnly bool) (bool, error) {
	where := `last_seen > now() - $1 * interval '1 millisecond'`
	if leaderOnly {
		where = `leader AND ` + where
	}
	var ok bool
	err := s.db.GetContext(ctx, &ok, s.sql(`SELECT EXISTS (SELECT 1 FROM @schema.broadcasters WHERE `+where+`)`), d.Milliseconds())
	return ok, notMigrated(err)
}
