package schema

import (
	"context"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"slices"
	"time"

	"github.com/jmoiron/sqlx"

	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/wire"
)

// stateQuery reads the whole state as JSON: the agent_state() function of
// migration 008, which agents call with no privilege on any table
// (docs/SECURITY.md). One statement reads one snapshot, so the releases
// match the epoch without a transaction.
const stateQuery = `SELECT @schema.agent_state()`

// stateJSON is what agent_state() returns.
type stateJSON struct {
	Epoch    int64  `json:"epoch"`
	StoreID  string `json:"store_id"`
	Releases []struct {
		Name     string          `json:"name"`
		Phase    string          `json:"phase"`
		Removals json.RawMessage `json:"removals"`
	} `json:"releases"`
}

// decodeState builds a state from what agent_state() returned.
func decodeState(raw []byte) (wire.State, error) {
	st := wire.State{V: wire.Version, Kind: wire.KindState, Releases: []wire.Release{}}
	var j stateJSON
	if err := json.Unmarshal(raw, &j); err != nil {
		return st, err
	}
	st.Epoch, st.StoreID = j.Epoch, j.StoreID
	for _, r := range j.Releases {
		rel, err := release(r.Name, r.Phase, r.Removals)
		if err != nil {
			return st, err
		}
		st.Releases = append(st.Releases, rel)
	}
	return st, nil
}

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
	var raw []byte
	if err := q.QueryRowxContext(ctx, s.sql(stateQuery)).Scan(&raw); err != nil {
		return wire.State{V: wire.Version, Kind: wire.KindState, Releases: []wire.Release{}}, notMigrated(err)
	}
	return decodeState(raw)
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

// StateDigest returns the digest of the current state
// (wire.State.Digest), as the last change wrote it: one primary-key read.
// It is empty when no change has written one yet. The digest covers the
// epoch, so a digest written before a change made without one matches no
// state message.
func (s *Store) StateDigest(ctx context.Context) (string, error) {
	var d sql.NullString
	err := s.db.GetContext(ctx, &d, s.sql(`SELECT @schema.agent_digest()`))
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
	// Refused are statuses that changed nothing because they did not
	// prove who sent them (RefusedUnauthenticated), or carried a seq too
	// far ahead (RefusedSeqBound): record_agents in migration 008.
	Refused []Refusal
}

// Refusal is a status the store refused, and why.
type Refusal struct {
	StatusKey
	Reason string `json:"reason"`
}

// Reasons of a Refusal.
const (
	// RefusedUnauthenticated: no token, another token than the row's, or
	// a sender not allowed to enrol agents of the service.
	RefusedUnauthenticated = "unauthenticated"
	// RefusedSeqBound: the seq is more than MaxSeqStep ahead of the row's.
	RefusedSeqBound = "seq_bound"
)

// MaxSeqStep is how far ahead of its row's seq a status's seq may be
// (2^40: an agent numbering a status every nanosecond takes 18 minutes
// to cover it, one heartbeating every second 35 000 years). Further
// ahead is refused, so no status can park a row at the top of the range
// and have every later real one ignored as a replay.
const MaxSeqStep = 1 << 40

// Has reports whether the store kept the status of agent id from
// incarnation.
func (r Recorded) Has(id, incarnation string) bool {
	return slices.Contains(r.Kept, StatusKey{AgentID: id, Incarnation: incarnation})
}

// Sent is a status with the principal that sent it: "amqp:<user>" for
// the broker user RabbitMQ validated (the user_id property), "" for none.
type Sent struct {
	wire.Status
	Principal string `json:"principal"`
}

// newestStatuses keeps each agent incarnation's newest status of a batch:
// one statement may touch each row once, and older ones are superseded.
func newestStatuses(statuses []Sent) []Sent {
	newest := make(map[StatusKey]int, len(statuses))
	batch := make([]Sent, 0, len(statuses))
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

// recordRow is a status as record_agents reads it: the columns of its
// jsonb_to_recordset and nothing else. The server parses the whole batch
// as JSON before it looks at a row, and parsing was a third of a
// 1,000-status batch's time; a full wire.Status also carries its version,
// kind, store id and send time, which the broadcaster has checked
// already, so leaving them out makes the batch a third smaller.
type recordRow struct {
	AgentID      string   `json:"agent_id"`
	Incarnation  string   `json:"incarnation,omitempty"`
	Service      string   `json:"service"`
	Host         string   `json:"host"`
	PID          int      `json:"pid"`
	Version      string   `json:"version"`
	Releases     []string `json:"releases"`
	AppName      string   `json:"app_name,omitempty"`
	Seq          uint64   `json:"seq"`
	AppliedEpoch int64    `json:"applied_epoch"`
	DrainedEpoch int64    `json:"drained_epoch"`
	Inflight     int64    `json:"inflight"`
	Leaving      bool     `json:"leaving,omitempty"`
	Token        string   `json:"token,omitempty"`
	Principal    string   `json:"principal"`
}

func recordRows(batch []Sent) []recordRow {
	rows := make([]recordRow, len(batch))
	for i, st := range batch {
		rows[i] = recordRow{
			AgentID: st.AgentID, Incarnation: st.Incarnation, Service: st.Service, Host: st.Host, PID: st.PID,
			Version: st.Version, Releases: st.Releases, AppName: st.AppName, Seq: st.Seq,
			AppliedEpoch: st.AppliedEpoch, DrainedEpoch: st.DrainedEpoch, Inflight: st.Inflight,
			Leaving: st.Leaving, Token: st.Token, Principal: st.Principal,
		}
	}
	return rows
}

// scanRecorded decodes record_agents' JSON outcome.
func scanRecorded(kept, conflicts, refused []byte, into *Recorded) error {
	if err := json.Unmarshal(kept, &into.Kept); err != nil {
		return err
	}
	if err := json.Unmarshal(refused, &into.Refused); err != nil {
		return err
	}
	return json.Unmarshal(conflicts, &into.Conflicts)
}

// RecordStatuses records a batch of agent statuses in one transaction and
// returns the epoch current at that moment and the ids recorded (replayed,
// stale, conflicting and refused statuses are left out): RecordStatusBatch,
// for callers that need no more than the ids.
func (s *Store) RecordStatuses(ctx context.Context, statuses []wire.Status, lease time.Duration) (epoch int64, recorded []string, err error) {
	rec, err := s.RecordStatusBatch(ctx, statuses, lease)
	for _, k := range rec.Kept {
		recorded = append(recorded, k.AgentID)
	}
	return rec.Epoch, recorded, err
}

// RecordStatusBatch records statuses as sent by this store connection's
// own role (principal "db:<session_user>"): RecordSent for callers that
// hold the store's owner role, such as tests and tools.
func (s *Store) RecordStatusBatch(ctx context.Context, statuses []wire.Status, lease time.Duration) (Recorded, error) {
	batch := make([]Sent, len(statuses))
	for i, st := range statuses {
		batch[i] = Sent{Status: st}
	}
	return s.record(ctx, recordAsSessionQuery, batch, lease, false)
}

// RecordSent records a batch of agent statuses, each with the principal
// that sent it, in one transaction, and says which it kept, by agent and
// incarnation (replayed, stale, conflicting and refused statuses are left
// out), and at which epoch. The rule is record_agents' (migration 008):
// only a status with its row's token changes a row, and only an allowed
// principal creates one; anyPrincipal skips the principal check (a
// broadcaster run with --insecure). Holding the epoch row FOR SHARE, taken
// first, orders the write against flips: a flip that commits after this
// batch is seen by a runner that also sees these leases, and a flip that
// committed before it is in the returned epoch, which the grants carry.
// Only a kept status may be answered with a grant.
func (s *Store) RecordSent(ctx context.Context, batch []Sent, lease time.Duration, anyPrincipal bool) (Recorded, error) {
	return s.record(ctx, recordQuery, batch, lease, anyPrincipal)
}

// recordQuery is record_agents in one statement, so its own transaction:
// one round trip and one plan per batch, which matters for the heartbeats
// that arrive one or two at a time; no client can leave it idle in a
// transaction. The batch is sent as text, which binary_parameters=yes
// leaves alone.
const recordQuery = `SELECT epoch, kept, conflicts, refused FROM @schema.record_agents($1::text::jsonb, $2, $3)`

// recordAsSessionQuery is recordQuery with every status's principal the
// session's role.
const recordAsSessionQuery = `SELECT epoch, kept, conflicts, refused FROM @schema.record_agents(
	(SELECT COALESCE(jsonb_agg(e || jsonb_build_object('principal', 'db:' || session_user)), '[]')
	 FROM jsonb_array_elements($1::text::jsonb) e), $2, $3)`

// jsonParam passes encoded JSON as a query parameter. A string goes in
// text format whatever lib/pq's binary_parameters says, and the server
// parses it for $1::text::jsonb; a []byte would go in binary format under
// binary_parameters=yes (which lib/pq needs behind a transaction pooler)
// and jsonb's binary input would reject it ("unsupported jsonb version
// number").
func jsonParam(b []byte) string { return string(b) }

func (s *Store) record(ctx context.Context, query string, batch []Sent, lease time.Duration, anyPrincipal bool) (Recorded, error) {
	var rec Recorded
	if len(batch) == 0 {
		return rec, nil
	}
	payload, err := json.Marshal(recordRows(newestStatuses(batch)))
	if err != nil {
		return rec, err
	}
	var kept, conflicts, refused []byte
	err = s.db.QueryRowContext(ctx, s.sql(query), jsonParam(payload), lease.Milliseconds(), anyPrincipal).Scan(&rec.Epoch, &kept, &conflicts, &refused)
	if err != nil {
		return rec, notMigrated(err)
	}
	return rec, scanRecorded(kept, conflicts, refused, &rec)
}

// syncQuery is agent_sync (migration 008): the status recorded, as sent
// by the session's role, and the state read, in one statement under the
// epoch row FOR SHARE.
const syncQuery = `SELECT @schema.agent_sync($1::text::jsonb, $2, $3)`

// syncJSON is what agent_sync returns.
type syncJSON struct {
	State    json.RawMessage `json:"state"`
	Kept     bool            `json:"kept"`
	Conflict bool            `json:"conflict"`
	Refused  *string         `json:"refused"`
	Holder   *struct {
		Incarnation string `json:"incarnation"`
		Host        string `json:"host"`
		PID         int    `json:"pid"`
		Seq         int64  `json:"seq"`
		Live        bool   `json:"live"`
	} `json:"holder"`
}

// SyncAgent is an agent's path to the truth without the broker: in one
// statement (agent_sync, which a service's role may execute without any
// privilege on a table) it records the agent's status with a fresh lease,
// under the rule of the broker path with the session's role as principal,
// and reads the whole state. An agent that is fenced, or that must
// confirm a state message, calls it. Because the lease and the read commit
// together under the epoch row lock, a runner either sees this lease and
// waits for the agent, or the agent reads the flip the runner acts on.
//
// If the store does not record the status (another live process holds
// the agent's ID, the status is not newer than the one recorded for its
// incarnation, or it did not prove who sent it), SyncAgent returns the
// state it read together with a *StatusIgnoredError (errors.Is
// ErrStatusIgnored): the state is the truth, but no lease was granted, and
// the agent must stay fenced.
func (s *Store) SyncAgent(ctx context.Context, st wire.Status, lease time.Duration) (wire.State, error) {
	token, err := hex.DecodeString(st.Token)
	if err != nil {
		return wire.State{}, fmt.Errorf("status token: %w", err)
	}
	st.Token = "" // it travels as its own parameter, never in the JSON
	payload, err := json.Marshal(st)
	if err != nil {
		return wire.State{}, err
	}
	var raw []byte
	if err := s.db.QueryRowContext(ctx, s.sql(syncQuery), jsonParam(payload), token, lease.Milliseconds()).Scan(&raw); err != nil {
		return wire.State{}, notMigrated(err)
	}
	var out syncJSON
	if err := json.Unmarshal(raw, &out); err != nil {
		return wire.State{}, err
	}
	state, err := decodeState(out.State)
	if err != nil || out.Kept {
		return state, err
	}
	e := &StatusIgnoredError{AgentID: st.AgentID, Incarnation: st.Incarnation, Seq: st.Seq, Conflict: out.Conflict}
	if out.Refused != nil {
		e.Refused = *out.Refused
	}
	if h := out.Holder; h != nil {
		e.HolderIncarnation, e.HolderHost, e.HolderPID, e.HolderSeq = h.Incarnation, h.Host, h.PID, h.Seq
		e.Conflict = e.Conflict || h.Live && h.Incarnation != st.Incarnation
	}
	return state, e
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
