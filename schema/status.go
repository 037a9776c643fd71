package schema

import (
	"context"
	"slices"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"

	"github.com/phasecast/phasecast/internal/phase"
)

// Agent is one agent's row in the registry, with its lease read on the
// database clock.
type Agent struct {
	ID             string         `db:"id" json:"id"`
	Service        string         `db:"service" json:"service"`
	Host           string         `db:"host" json:"host"`
	PID            int            `db:"pid" json:"pid"`
	Version        string         `db:"version" json:"version"`
	Releases       pq.StringArray `db:"releases" json:"releases"`
	AppName        string         `db:"app_name" json:"app_name,omitempty"`
	Seq            int64          `db:"seq" json:"seq"`
	AppliedEpoch   int64          `db:"applied_epoch" json:"applied_epoch"`
	DrainedEpoch   int64          `db:"drained_epoch" json:"drained_epoch"`
	Inflight       int64          `db:"inflight" json:"inflight"`
	LastSeen       time.Time      `db:"last_seen" json:"last_seen"`
	LeaseExpiresAt time.Time      `db:"lease_expires_at" json:"lease_expires_at"`
	// LeaseRemainingMS is negative once the lease has expired.
	LeaseRemainingMS int64 `db:"lease_remaining_ms" json:"lease_remaining_ms"`
	// Incarnation is the process whose statuses the row holds (empty for
	// agents that predate incarnations).
	Incarnation string `db:"incarnation" json:"incarnation,omitempty"`
	// VouchedBy is the principal that enrolled the row ("amqp:<user>",
	// "db:<role>"; empty when no principal was checked: a broadcaster run
	// with --insecure, or a row older than migration 008).
	VouchedBy string `db:"vouched_by" json:"vouched_by"`
	// Rivals are other live processes claiming the same ID (Conflicted).
	Rivals Rivals `db:"rivals" json:"rivals,omitempty"`
}

// Live reports whether the agent's lease had not expired when it was read.
func (a *Agent) Live() bool { return a.LeaseRemainingMS > 0 }

// Knows reports whether the agent's code was built for release.
func (a *Agent) Knows(release string) bool {
	for _, r := range a.Releases {
		if r == release {
			return true
		}
	}
	return false
}

// Acked reports whether the agent has acknowledged a release's flip to
// contract at contractEpoch: its code knows the release, it has drained
// that epoch, and no other live process claims its ID (Conflicted). Code
// that predates the release never acknowledges.
func (a *Agent) Acked(release string, contractEpoch int64) bool {
	return a.Knows(release) && a.DrainedEpoch >= contractEpoch && !a.Conflicted()
}

// ackedWhere is Acked as a condition on a row of @schema.agents, $1 the
// release and $2 the epoch, for counting acknowledgements without reading
// every row. TestCountAckedIsAcked holds it to Acked.
const ackedWhere = `$1 = ANY (releases) AND drained_epoch >= $2
	AND NOT EXISTS (SELECT 1 FROM @schema.agent_conflicts c WHERE ` + liveRivalOf + `)`

// CountAcked counts the agents whose ID starts with idPrefix (every
// agent, when it is empty) that have acknowledged release's flip at epoch,
// as Acked decides, live or not: one count, cheap enough to poll.
func (s *Store) CountAcked(ctx context.Context, release string, epoch int64, idPrefix string) (int, error) {
	var n int
	err := s.db.GetContext(ctx, &n, s.sql(`SELECT count(*) FROM @schema.agents WHERE `+ackedWhere+` AND starts_with(id, $3)`), release, epoch, idPrefix)
	return n, notMigrated(err)
}

const agentColumns = `id, service, host, pid, version, releases, app_name, seq, applied_epoch, drained_epoch,
	inflight, last_seen, lease_expires_at,
	(extract(epoch FROM lease_expires_at - now()) * 1000)::bigint AS lease_remaining_ms, incarnation, vouched_by, ` + rivalsColumn

// LiveAgents returns the agents whose lease has not expired on the database
// clock, ordered by service and id.
func (s *Store) LiveAgents(ctx context.Context) ([]Agent, error) {
	return s.agents(ctx, s.db, true)
}

// Agents returns every registered agent, live or not.
func (s *Store) Agents(ctx context.Context) ([]Agent, error) {
	return s.agents(ctx, s.db, false)
}

func (s *Store) agents(ctx context.Context, q sqlx.QueryerContext, liveOnly bool) ([]Agent, error) {
	query := `SELECT ` + agentColumns + ` FROM @schema.agents`
	if liveOnly {
		query += ` WHERE lease_expires_at > now()`
	}
	query += ` ORDER BY service, id`
	var agents []Agent
	err := sqlx.SelectContext(ctx, q, &agents, s.sql(query))
	return agents, notMigrated(err)
}

// ReleaseStatus is one release in a status report.
type ReleaseStatus struct {
	ReleaseRow
	ContractEpoch *int64    `json:"contract_epoch,omitempty"`
	Removed       []Removal `json:"removed"`
	UpdatedAt     time.Time `json:"updated_at"`
	// HeldBy is, for a release in contracting, the identity of the
	// contract runner that took it there (ReleaseRow.ContractingBy);
	// empty in any other phase, when no runner did, or on a store from
	// before migration 005.
	HeldBy string `json:"contracting_by,omitempty"`
}

// AuditEntry is one row of the audit log.
type AuditEntry struct {
	Release   string    `db:"release" json:"release"`
	FromPhase *string   `db:"from_phase" json:"from,omitempty"`
	ToPhase   string    `db:"to_phase" json:"to"`
	Epoch     int64     `db:"epoch" json:"epoch"`
	Actor     string    `db:"actor" json:"actor"`
	Note      string    `db:"note" json:"note,omitempty"`
	At        time.Time `db:"at" json:"at"`
}

// Report is everything 'phasecast status' shows.
type Report struct {
	Schema string `json:"schema"`
	// StoreID is the store's identity (Store.ID), which agents and
	// broadcasters check every message against; empty on a store from
	// before migration 003.
	StoreID string `json:"store_id,omitempty"`
	// StoreVersion is the newest migration applied to the store; Version
	// the newest this binary knows. When the store is behind, changes
	// refuse until 'phasecast migrate' runs.
	StoreVersion int             `json:"store_version"`
	Version      int             `json:"version"`
	Epoch        int64           `json:"epoch"`
	Unpublished  int64           `json:"unpublished_epoch,omitempty"`
	Releases     []ReleaseStatus `json:"releases"`
	Agents       []Agent         `json:"agents"`
	Broadcasters []Broadcaster   `json:"broadcasters"`
	RecentFlips  []AuditEntry    `json:"recent_flips"`

	// Now is when the report was read, on the database clock, which
	// leases and liveness are measured on.
	Now time.Time `json:"now"`
}

// Report reads a status report in one read-only snapshot, so its parts
// agree with each other.
func (s *Store) Report(ctx context.Context, recentFlips int) (*Report, error) {
	ms, err := loadMigrations()
	if err != nil {
		return nil, err
	}
	rep := &Report{Schema: s.schema, Version: ms[len(ms)-1].version}
	err = s.inTxOpts(ctx, readOnlySnapshot, func(tx *sqlx.Tx) error {
		// A store behind this binary is reported too: what a missing
		// migration adds is read only where it was applied.
		var applied []int
		if err := tx.SelectContext(ctx, &applied, s.sql(`SELECT version FROM @schema.schema_migrations ORDER BY version`)); err != nil {
			return err
		}
		if len(applied) > 0 {
			rep.StoreVersion = applied[len(applied)-1]
		}
		if slices.Contains(applied, migrationStoreIdentity) {
			if err := tx.GetContext(ctx, &rep.StoreID, s.sql(storeIDQuery)); err != nil {
				return err
			}
		}
		columns := releaseColumns + `, updated_at`
		if slices.Contains(applied, migrationContractingBy) {
			columns += `, contracting_by`
		}
		if err := tx.GetContext(ctx, &rep.Epoch, s.sql(epochQuery)); err != nil {
			return err
		}
		if err := tx.GetContext(ctx, &rep.Now, `SELECT now()`); err != nil {
			return err
		}
		var unpublished *int64
		if err := tx.GetContext(ctx, &unpublished, s.sql(unpublishedQuery)); err != nil {
			return err
		}
		if unpublished != nil {
			rep.Unpublished = *unpublished
		}
		var rows []struct {
			ReleaseRow
			UpdatedAt time.Time `db:"updated_at"`
		}
		if err := tx.SelectContext(ctx, &rows, s.sql(`SELECT `+columns+` FROM @schema.releases ORDER BY created_at, name`)); err != nil {
			return err
		}
		for _, r := range rows {
			m, err := r.LoadManifest()
			if err != nil {
				return err
			}
			rs := ReleaseStatus{ReleaseRow: r.ReleaseRow, Removed: nonNilRemovals(m.Removed), UpdatedAt: r.UpdatedAt}
			if r.ContractEpoch.Valid {
				rs.ContractEpoch = &r.ContractEpoch.Int64
			}
			if r.Phase == phase.Contracting {
				rs.HeldBy = r.ContractingBy.String
			}
			rep.Releases = append(rep.Releases, rs)
		}
		var err error
		if rep.Agents, err = s.agents(ctx, tx, false); err != nil {
			return err
		}
		if err := tx.SelectContext(ctx, &rep.Broadcasters, s.sql(`SELECT id, host, pid, leader, started_at, last_seen FROM @schema.broadcasters ORDER BY leader DESC, id`)); err != nil {
			return err
		}
		return tx.SelectContext(ctx, &rep.RecentFlips, s.sql(`SELECT release, from_phase, to_phase, epoch, actor, note, at FROM @schema.audit ORDER BY id DESC LIMIT $1`), recentFlips)
	})
	return rep, err
}

// The migrations whose additions Report reads only once applied.
const (
	migrationStoreIdentity = 3 // 003_store_identity: store_identity
	migrationContractingBy = 5 // 005_contracting_by: releases.contracting_by
)

func nonNilRemovals(r []Removal) []Removal {
	if r == nil {
		return []Removal{}
	}
	return r
}
