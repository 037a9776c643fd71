package schema

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"

	"github.com/phasecast/phasecast/internal/phase"
)

// ApplyResult reports what ApplyRelease did.
type ApplyResult struct {
	Release   string      `json:"release"`
	Phase     phase.Phase `json:"phase"`
	Epoch     int64       `json:"epoch"`
	Unchanged bool        `json:"unchanged"` // identical manifest already applied
	Updated   bool        `json:"updated"`   // changed manifest replaced one still in expand
}

// ApplyRelease registers a release in expand and runs its expand SQL, all
// in one transaction. Re-applying an identical manifest changes nothing. A
// changed manifest replaces the old one only while the release is still in
// expand; later it is refused.
func (s *Store) ApplyRelease(ctx context.Context, m *Manifest, actor string) (ApplyResult, error) {
	res := ApplyResult{Release: m.Release, Phase: phase.Expand}
	digest := m.Digest()
	manifestJSON, err := json.Marshal(m)
	if err != nil {
		return res, err
	}
	err = s.inTx(ctx, func(tx *sqlx.Tx) error {
		if _, err := tx.ExecContext(ctx, `SELECT pg_advisory_xact_lock(hashtext($1))`, s.LockKey("release:"+m.Release)); err != nil {
			return err
		}
		var cur struct {
			Phase  phase.Phase `db:"phase"`
			Digest string      `db:"digest"`
			Epoch  int64       `db:"phase_epoch"`
		}
		err := tx.GetContext(ctx, &cur, s.sql(`SELECT phase, digest, phase_epoch FROM @schema.releases WHERE name = $1 FOR UPDATE`), m.Release)
		exists := err == nil
		switch {
		case errors.Is(err, sql.ErrNoRows):
		case err != nil:
			return err
		case cur.Digest == digest:
			res.Unchanged, res.Phase, res.Epoch = true, cur.Phase, cur.Epoch
			return nil
		case cur.Phase != phase.Expand:
			return fmt.Errorf("%w: release %q is in %s; its manifest can change only in expand (ship a new release instead)", ErrManifestChanged, m.Release, cur.Phase)
		}
		epoch, err := s.bumpEpoch(ctx, tx)
		if err != nil {
			return err
		}
		for i, stmt := range m.Expand {
			if _, err := tx.ExecContext(ctx, stmt); err != nil {
				return &ExpandError{Index: i, Err: err}
			}
		}
		if _, err := tx.ExecContext(ctx, s.sql(`
			INSERT INTO @schema.releases (name, description, phase, manifest, digest, phase_epoch)
			VALUES ($1, $2, 'expand', $3, $4, $5)
			ON CONFLICT (name) DO UPDATE SET description = $2, manifest = $3, digest = $4, phase_epoch = $5, updated_at = now()`),
			m.Release, m.Description, jsonParam(manifestJSON), digest, epoch); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, s.sql(`DELETE FROM @schema.removals WHERE release = $1`), m.Release); err != nil {
			return err
		}
		for i, r := range m.Removed {
			if _, err := tx.ExecContext(ctx, s.sql(`
				INSERT INTO @schema.removals (release, ordinal, table_schema, table_name, columns, "cascade")
				VALUES ($1, $2, $3, $4, $5, $6)`),
				m.Release, i, r.Schema, r.Table, pq.StringArray(nonNil(r.Columns)), r.Cascade); err != nil {
				return err
			}
		}
		var from *phase.Phase
		if exists {
			from = &cur.Phase
		}
		res.Updated, res.Epoch = exists, epoch
		return s.recordChange(ctx, tx, m.Release, from, phase.Expand, epoch, actor, "release apply")
	})
	return res, err
}

// FlipOptions tune a flip.
type FlipOptions struct {
	Actor string // who flipped, for the audit log
	Note  string
	// Check runs inside the flip's transaction after the move is known to
	// be allowed and before anything is written; an error refuses the flip.
	Check func(ctx context.Context, tx *sqlx.Tx, rel *ReleaseRow) error
}

// FlipResult reports an accepted flip.
type FlipResult struct {
	Release string      `json:"release"`
	From    phase.Phase `json:"from"`
	To      phase.Phase `json:"to"`
	Epoch   int64       `json:"epoch"`
}

// ReleaseRow is a release as stored.
type ReleaseRow struct {
	Name          string        `db:"name" json:"name"`
	Description   string        `db:"description" json:"description,omitempty"`
	Phase         phase.Phase   `db:"phase" json:"phase"`
	PhaseEpoch    int64         `db:"phase_epoch" json:"phase_epoch"`
	ContractEpoch sql.NullInt64 `db:"contract_epoch" json:"-"`
	Manifest      []byte        `db:"manifest" json:"-"`
	// ContractingBy is the identity of the contract runner that took the
	// release to contracting; not valid when it is not there, or when
	// something other than a runner of this version put it there. Release
	// fills it, and Report too once the store has migration 005.
	ContractingBy sql.NullString `db:"contracting_by" json:"-"`
}

// LoadManifest decodes the manifest stored with the release.
func (r *ReleaseRow) LoadManifest() (*Manifest, error) {
	var m Manifest
	if err := json.Unmarshal(r.Manifest, &m); err != nil {
		return nil, fmt.Errorf("release %q: stored manifest: %w", r.Name, err)
	}
	return &m, nil
}

// Flip moves a release to phase to. The phase, the epoch, the audit row and
// the outbox row are written, and NOTIFY sent, in one transaction. A
// refused flip changes nothing. Flipping to contract first runs every
// precondition of the release. Contracting and complete are refused with a
// *TransitionError that says to run 'phasecast contract': only the contract
// runner enters them (phase.Phase.RunnerOnly), after its own checks.
func (s *Store) Flip(ctx context.Context, release string, to phase.Phase, opts FlipOptions) (FlipResult, error) {
	return s.flip(ctx, release, to, opts, "")
}

// flip is Flip for the contract runner too: runner is its identity, which
// may enter the runner's phases and is recorded as the release's
// contracting_by when it enters contracting; "" for anyone else.
func (s *Store) flip(ctx context.Context, release string, to phase.Phase, opts FlipOptions, runner string) (FlipResult, error) {
	res := FlipResult{Release: release, To: to}
	if !to.Valid() {
		_, err := phase.Parse(string(to))
		return res, err
	}
	err := s.inTx(ctx, func(tx *sqlx.Tx) error {
		rel, err := s.lockRelease(ctx, tx, release)
		if err != nil {
			return err
		}
		res.From = rel.Phase
		if to.RunnerOnly() && runner == "" {
			return &TransitionError{Release: release, From: rel.Phase, To: to, Reason: fmt.Sprintf(
				"only the contract runner moves a release to %s, after its checks and the wait for every live agent's acknowledgement: run 'phasecast contract %s'",
				to, release)}
		}
		if !phase.CanMove(rel.Phase, to) {
			return &TransitionError{Release: release, From: rel.Phase, To: to}
		}
		if to == phase.Contract {
			m, err := rel.LoadManifest()
			if err != nil {
				return err
			}
			if err := runPreconditions(ctx, tx, m); err != nil {
				return err
			}
		}
		if opts.Check != nil {
			if err := opts.Check(ctx, tx, rel); err != nil {
				return err
			}
		}
		epoch, err := s.bumpEpoch(ctx, tx)
		if err != nil {
			return err
		}
		res.Epoch = epoch
		if _, err := tx.ExecContext(ctx, s.sql(`
			UPDATE @schema.releases SET phase = $2, phase_epoch = $3, updated_at = now(),
				contract_epoch = CASE WHEN $2 = 'contract' THEN $3 ELSE contract_epoch END,
				contracting_by = CASE WHEN $2 = 'contracting' THEN $4 ELSE contracting_by END
			WHERE name = $1`), release, to, epoch, runner); err != nil {
			return err
		}
		return s.recordChange(ctx, tx, release, &rel.Phase, to, epoch, opts.Actor, opts.Note)
	})
	return res, err
}

// Rollback moves a release from contract back to migrate. It is refused
// once a runner has taken the release to contracting.
func (s *Store) Rollback(ctx context.Context, release string, opts FlipOptions) (FlipResult, error) {
	rel, err := s.Release(ctx, release)
	if err != nil {
		return FlipResult{Release: release, To: phase.Migrate}, err
	}
	if rel.Phase != phase.Contract {
		return FlipResult{Release: release, From: rel.Phase, To: phase.Migrate},
			&TransitionError{Release: release, From: rel.Phase, To: phase.Migrate, Reason: "rollback goes from contract to migrate only"}
	}
	// Flip re-checks the phase under the row lock, so a runner that took
	// the release to contracting in between wins and this is refused.
	return s.Flip(ctx, release, phase.Migrate, opts)
}

// releaseColumns are the columns of a ReleaseRow that every store
// version has; Report reads them, so that 'phasecast status' works on a
// store older than the binary.
const releaseColumns = `name, description, phase, phase_epoch, contract_epoch, manifest`

// Release returns one release.
func (s *Store) Release(ctx context.Context, name string) (*ReleaseRow, error) {
	r, err := s.getRelease(ctx, s.db, name, "")
	return r, notMigrated(err)
}

// lockRelease reads one release and holds its row until tx ends.
func (s *Store) lockRelease(ctx context.Context, tx *sqlx.Tx, name string) (*ReleaseRow, error) {
	return s.getRelease(ctx, tx, name, " FOR UPDATE")
}

// getRelease reads one release, with suffix (a locking clause, or "")
// appended to the query.
func (s *Store) getRelease(ctx context.Context, q sqlx.QueryerContext, name, suffix string) (*ReleaseRow, error) {
	var r ReleaseRow
	err := sqlx.GetContext(ctx, q, &r, s.sql(`SELECT `+releaseColumns+`, contracting_by FROM @schema.releases WHERE name = $1`+suffix), name)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, &UnknownReleaseError{Release: name}
	}
	return &r, err
}

func runPreconditions(ctx context.Context, tx *sqlx.Tx, m *Manifest) error {
	for i, p := range m.Preconditions {
		// A savepoint keeps a failing precondition from poisoning the
		// transaction, so the error we return is the precondition's own.
		sp := fmt.Sprintf("precondition_%d", i)
		if _, err := tx.ExecContext(ctx, "SAVEPOINT "+sp); err != nil {
			return err
		}
		rows, err := tx.QueryContext(ctx, p.SQL)
		if err != nil {
			return &PreconditionError{Release: m.Release, Name: p.Name, Err: err}
		}
		found := rows.Next()
		err = errors.Join(rows.Err(), rows.Close())
		if err != nil {
			return &PreconditionError{Release: m.Release, Name: p.Name, Err: err}
		}
		if found {
			return &PreconditionError{Release: m.Release, Name: p.Name}
		}
		if _, err := tx.ExecContext(ctx, "RELEASE SAVEPOINT "+sp); err != nil {
			return err
		}
	}
	return nil
}

// CheckPreconditions runs a release's preconditions outside any flip, for
// the contract runner's re-check.
func (s *Store) CheckPreconditions(ctx context.Context, m *Manifest) error {
	return s.inTxOpts(ctx, &sql.TxOptions{ReadOnly: true}, func(tx *sqlx.Tx) error {
		return runPreconditions(ctx, tx, m)
	})
}

// bumpEpoch increments the global epoch. Every writer calls it before
// writing anything else: see 001_init.up.sql.
func (s *Store) bumpEpoch(ctx context.Context, tx *sqlx.Tx) (int64, error) {
	var epoch int64
	err := tx.GetContext(ctx, &epoch, s.sql(`UPDATE @schema.epoch SET value = value + 1 RETURNING value`))
	return epoch, err
}

// recordChange writes the outbox and audit rows of a change and the
// digest of the state it leaves, and sends NOTIFY; the notification is
// delivered only if the transaction commits. Every change ends with it.
func (s *Store) recordChange(ctx context.Context, tx *sqlx.Tx, release string, from *phase.Phase, to phase.Phase, epoch int64, actor, note string) error {
	if actor == "" {
		actor = "unknown"
	}
	if _, err := tx.ExecContext(ctx, s.sql(`INSERT INTO @schema.events (epoch, release, from_phase, to_phase) VALUES ($1, $2, $3, $4)`), epoch, release, from, to); err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, s.sql(`INSERT INTO @schema.audit (release, from_phase, to_phase, epoch, actor, note) VALUES ($1, $2, $3, $4, $5, $6)`), release, from, to, epoch, actor, note); err != nil {
		return err
	}
	if err := s.sealState(ctx, tx); err != nil {
		return err
	}
	_, err := tx.ExecContext(ctx, `SELECT pg_notify($1, $2)`, s.NotifyChannel(), fmt.Sprint(epoch))
	return err
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}
