package schema

import (
	"context"
	"database/sql"
	"encoding/json"
	"slices"
	"time"

	"github.com/jmoiron/sqlx"

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

// recordAgents records statuses: the data-modifying part of
// recordStatusesQuery and syncAgentQuery, which add what each returns. $1
// is the batch (at most one status per agent and incarnation), $2 the
// lease in milliseconds.
//
// A row belongs to one incarnation (one agent process) at a time. A
// status is recorded when its agent has no row yet, when it comes from the
// row's incarnation with a newer seq, or when it comes from another
// incarnation and the row's lease is over (the holder stopped, said
// goodbye or died): seq orders statuses within an incarnation only, so a
// restarted agent is never mistaken for a replay of its former self,
// whatever its clock did. A status from another incarnation while the
// row's lease is live is a conflict: two processes claim one ID. It is not
// recorded as the row's state; it is kept in agent_conflicts instead, with
// the lease it asked for, and while that lasts the ID counts as not
// acknowledged (Agent.Rivals). Anything else (a replay, a reordering) is
// ignored.
//
// The lease never moves earlier than one already granted, whatever lease
// length this status carries (a broadcaster run with a shorter --lease, a
// standby taking over, an agent's long initial lease): the agent's own
// deadline was set from the longer one. Only a goodbye (leaving) ends it
// at once.
//
// candidate picks one status per agent from the snapshot the statement
// reads, since ON CONFLICT cannot touch a row twice; the ON CONFLICT WHERE
// decides again on the row as locked, so concurrent writers (a broadcaster
// batch, an agent's own sync) cannot both take it. A conflict that such a
// race hides is found by the loser's next status; the loser is ignored
// either way, and stays fenced.
const recordAgents = `
x AS (
    SELECT x.agent_id, COALESCE(x.incarnation, '') AS incarnation, x.service, x.host, x.pid, x.version,
           x.releases, x.app_name, x.seq, x.applied_epoch, x.drained_epoch, x.inflight, COALESCE(x.leaving, false) AS leaving,
           CASE WHEN x.leaving THEN now() ELSE now() + $2 * interval '1 millisecond' END AS expires_at,
           a.incarnation AS holder, a.seq AS holder_seq, a.lease_expires_at > now() AS holder_live
    FROM jsonb_to_recordset($1::jsonb) AS x(agent_id text, incarnation text, service text, host text, pid int, version text,
        releases jsonb, app_name text, seq bigint, applied_epoch bigint, drained_epoch bigint, inflight bigint, leaving boolean)
    LEFT JOIN @schema.agents a ON a.id = x.agent_id
),
candidate AS (
    SELECT DISTINCT ON (agent_id) * FROM x
    WHERE holder IS NULL OR (incarnation = holder AND seq > holder_seq) OR (incarnation <> holder AND NOT holder_live)
    ORDER BY agent_id, (incarnation = holder) IS TRUE DESC, seq DESC
),
recorded AS (
    INSERT INTO @schema.agents AS a (id, incarnation, service, host, pid, version, releases, app_name, seq,
        applied_epoch, drained_epoch, inflight, last_seen, lease_expires_at)
    SELECT agent_id, incarnation, service, host, pid, version,
           ARRAY(SELECT jsonb_array_elements_text(COALESCE(releases, '[]'))), COALESCE(app_name, ''), seq,
           applied_epoch, drained_epoch, inflight, now(), expires_at
    FROM candidate
    ON CONFLICT (id) DO UPDATE SET
        incarnation = EXCLUDED.incarnation, service = EXCLUDED.service, host = EXCLUDED.host, pid = EXCLUDED.pid,
        version = EXCLUDED.version, releases = EXCLUDED.releases, app_name = EXCLUDED.app_name, seq = EXCLUDED.seq,
        applied_epoch = EXCLUDED.applied_epoch, drained_epoch = EXCLUDED.drained_epoch,
        inflight = EXCLUDED.inflight, last_seen = EXCLUDED.last_seen,
        lease_expires_at = CASE WHEN EXCLUDED.lease_expires_at <= now() THEN EXCLUDED.lease_expires_at
                                ELSE GREATEST(a.lease_expires_at, EXCLUDED.lease_expires_at) END
    WHERE (a.incarnation = EXCLUDED.incarnation AND a.seq < EXCLUDED.seq)
       OR (a.incarnation <> EXCLUDED.incarnation AND a.lease_expires_at <= now())
    RETURNING a.id, a.incarnation, a.lease_expires_at > now() AS live
),
rivals AS (
    INSERT INTO @schema.agent_conflicts AS c (id, incarnation, service, host, pid, version, seq, last_seen, expires_at)
    SELECT x.agent_id, x.incarnation, x.service, x.host, x.pid, COALESCE(x.version, ''), x.seq, now(), x.expires_at
    FROM x LEFT JOIN recorded r ON r.id = x.agent_id
    WHERE x.incarnation <> COALESCE(r.incarnation, x.holder) AND COALESCE(r.live, x.holder_live)
    ON CONFLICT (id, incarnation) DO UPDATE SET
        service = EXCLUDED.service, host = EXCLUDED.host, pid = EXCLUDED.pid, version = EXCLUDED.version,
        seq = EXCLUDED.seq, last_seen = EXCLUDED.last_seen,
        expires_at = CASE WHEN EXCLUDED.expires_at <= now() THEN EXCLUDED.expires_at
                          ELSE GREATEST(c.expires_at, EXCLUDED.expires_at) END
    WHERE c.seq < EXCLUDED.seq
    RETURNING c.id, c.incarnation
),
-- An incarnation that now holds its row is nobody's rival any more.
settled AS (
    DELETE FROM @schema.agent_conflicts c USING recorded r WHERE c.id = r.id AND c.incarnation = r.incarnation
)`

// jsonParam passes encoded JSON as a query parameter. A string goes in
// text format whatever lib/pq's binary_parameters says, and the server
// parses it for $1::jsonb; a []byte would go in binary format under
// binary_parameters=yes (which lib/pq needs behind a transaction pooler)
// and jsonb's binary input would reject it ("unsupported jsonb version
// number").
func jsonParam(b []byte) string { return string(b) }

// recordOutcome is the select list after recordAgents: the statuses
// recorded and those refused as conflicts, each as JSON [{agent_id,
// incarnation}].
const recordOutcome = `
    COALESCE((SELECT json_agg(json_build_object('agent_id', id, 'incarnation', incarnation)) FROM recorded), '[]'),
    COALESCE((SELECT json_agg(json_build_object('agent_id', id, 'incarnation', incarnation)) FROM rivals), '[]')`

// Recorded is what the store did with a batch of statuses.
type Recorded struct {
	// Epoch is the epoch current when the batch was recorded.
	Epoch int64
	// Kept are the statuses recorded, at most one per agent: an agent's
	// newest in the batch from the incarnation that holds its row.
	Kept []StatusKey
	// Conflicts are statuses refused because another live incarnation
	// holds their agent's ID.
	Conflicts []StatusKey
}

// Has reports whether the store kept the status of agent id from
// incarnation.
func (r Recorded) Has(id, incarnation string) bool {
	return slices.Contains(r.Kept, StatusKey{AgentID: id, Incarnation: incarnation})
}

// newestStatuses keeps each agent incarnation's newest status of a batch:
// one statement may touch each row once, and older ones are superseded.
func newestStatuses(statuses []wire.Status) []wire.Status {
	newest := make(map[StatusKey]int, len(statuses))
	batch := make([]wire.Status, 0, len(statuses))
	for _, st := range statuses {
		k := StatusKey{AgentID: st.AgentID, Incarnation: st.Incarnation}
		if i, ok := newest[k]; ok {
			if st.Seq > batch[i].Seq {
				batch[i] = st
			}
			continue
		}
		newest[k] = len(batch)
		batch = append(batch, st)
	}
	return batch
}

// scanRecorded decodes recordOutcome.
func scanRecorded(kept, conflicts []byte, into *Recorded) error {
	if err := json.Unmarshal(kept, &into.Kept); err != nil {
		return err
	}
	return json.Unmarshal(conflicts, &into.Conflicts)
}

// RecordStatuses records a batch of agent statuses in one transaction and
// returns the epoch current at that moment and the ids recorded (replayed,
// stale and conflicting statuses are left out): RecordStatusBatch, for
// callers that need no more than the ids.
func (s *Store) RecordStatuses(ctx context.Context, statuses []wire.Status, lease time.Duration) (epoch int64, recorded []string, err error) {
	rec, err := s.RecordStatusBatch(ctx, statuses, lease)
	for _, k := range rec.Kept {
		recorded = append(recorded, k.AgentID)
	}
	return rec.Epoch, recorded, err
}

// RecordStatusBatch records a batch of agent statuses in one transaction
// and says which it kept, by agent and incarnation (replayed, stale and
// conflicting statuses are left out), and at which epoch. Holding the
// epoch row FOR SHARE orders the write against flips: a flip that commits
// after this batch is seen by a runner that also sees these leases, and a
// flip that committed before it is in the returned epoch, which the grants
// carry. Only a kept status may be answered with a grant.
func (s *Store) RecordStatusBatch(ctx context.Context, statuses []wire.Status, lease time.Duration) (Recorded, error) {
	var rec Recorded
	if len(statuses) == 0 {
		return rec, nil
	}
	payload, err := json.Marshal(newestStatuses(statuses))
	if err != nil {
		return rec, err
	}
	var kept, conflicts []byte
	err = s.db.QueryRowContext(ctx, s.sql(recordStatusesQuery), jsonParam(payload), lease.Milliseconds()).Scan(&rec.Epoch, &kept, &conflicts)
	if err != nil {
		return rec, notMigrated(err)
	}
	return rec, scanRecorded(kept, conflicts, &rec)
}

// recordStatusesQuery is recordAgents and the epoch read FOR SHARE in one
// statement, so its own transaction: one round trip and one plan per batch
// instead of four round trips, which matters for the heartbeats that
// arrive one or two at a time. The lock is held until the statement
// commits, whichever part runs first, which is all the ordering against
// flips needs; and no client can leave it idle in a transaction.
const recordStatusesQuery = `
WITH locked AS (SELECT value FROM @schema.epoch FOR SHARE),` + recordAgents + `
SELECT (SELECT value FROM locked),` + recordOutcome

// syncAgentQuery is recordAgents for SyncAgent, whose transaction already
// holds the epoch row.
const syncAgentQuery = `WITH` + recordAgents + `
SELECT` + recordOutcome

// SyncAgent is an agent's path to the truth without the broker: in one
// transaction it records the agent's status with a fresh lease and reads
// the whole state. An agent that is fenced, or that must confirm a state
// message, calls it. Because the lease and the read commit together under
// the epoch row lock, a runner either sees this lease and waits for the
// agent, or the agent reads the flip the runner acts on.
//
// If the store does not record the status (another live process holds
// the agent's ID, or the status is not newer than the one recorded for
// its incarnation), SyncAgent returns the state it read together with a
// *StatusIgnoredError (errors.Is ErrStatusIgnored): the state is the
// truth, but no lease was granted, and the agent must stay fenced.
func (s *Store) SyncAgent(ctx context.Context, st wire.Status, lease time.Duration) (wire.State, error) {
	var state wire.State
	payload, err := json.Marshal([]wire.Status{st})
	if err != nil {
		return state, err
	}
	var ignored *StatusIgnoredError
	err = s.inTx(ctx, func(tx *sqlx.Tx) error {
		var err error
		if state, err = s.readState(ctx, tx); err != nil {
			return err
		}
		var kept, conflicts []byte
		if err := tx.QueryRowContext(ctx, s.sql(syncAgentQuery), jsonParam(payload), lease.Milliseconds()).Scan(&kept, &conflicts); err != nil {
			return err
		}
		var rec Recorded
		if err := scanRecorded(kept, conflicts, &rec); err != nil {
			return err
		}
		if rec.Has(st.AgentID, st.Incarnation) {
			return nil
		}
		ignored, err = s.whyIgnored(ctx, tx, st, len(rec.Conflicts) > 0)
		return err
	})
	if err == nil && ignored != nil {
		return state, ignored
	}
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
