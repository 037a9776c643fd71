package schema

import (
	"context"
	"database/sql"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"

	"github.com/phasecast/phasecast/internal/config"
)

//go:embed migrations/*.up.sql
var migrationFiles embed.FS

// Store is the versioning store: phasecast's tables in their own PostgreSQL
// schema. It is safe for concurrent use.
type Store struct {
	db     *sqlx.DB
	schema string // unquoted name
	quoted string // pq.QuoteIdentifier(schema)
}

// ApplicationName names the store's database sessions when the URL names
// none, so the contract runner does not list them as outside sessions.
const ApplicationName = "phasecast"

// Open connects to databaseURL and returns a store for schemaName. The
// error never contains the URL's password.
func Open(ctx context.Context, databaseURL, schemaName string) (*Store, error) {
	dsn, err := config.WithApplicationName(databaseURL, ApplicationName)
	if err != nil {
		return nil, err
	}
	db, err := sqlx.Open("postgres", dsn)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", config.Redact(databaseURL), config.RedactError(err, databaseURL))
	}
	pingCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := db.PingContext(pingCtx); err != nil {
		db.Close()
		return nil, fmt.Errorf("connect to %s: %w", config.Redact(databaseURL), config.RedactError(err, databaseURL))
	}
	s, err := NewStore(db, schemaName)
	if err != nil {
		db.Close()
		return nil, err
	}
	return s, nil
}

// NewStore wraps an open database handle.
func NewStore(db *sqlx.DB, schemaName string) (*Store, error) {
	if err := ValidateIdentifier(schemaName); err != nil {
		return nil, fmt.Errorf("schema name: %w", err)
	}
	return &Store{db: db, schema: schemaName, quoted: pq.QuoteIdentifier(schemaName)}, nil
}

// DB returns the underlying handle.
func (s *Store) DB() *sqlx.DB { return s.db }

// Schema returns the store's schema name, unquoted.
func (s *Store) Schema() string { return s.schema }

// Close closes the database handle.
func (s *Store) Close() error { return s.db.Close() }

// NotifyChannel is the LISTEN/NOTIFY channel on which the store announces
// each new epoch.
func (s *Store) NotifyChannel() string { return "phasecast." + s.schema }

// Notify sends a NOTIFY on channel through the store's pool.
func (s *Store) Notify(ctx context.Context, channel, payload string) error {
	_, err := s.db.ExecContext(ctx, `SELECT pg_notify($1, $2)`, channel, payload)
	return err
}

// sql renders a query: every "@schema" becomes the quoted schema name.
func (s *Store) sql(query string) string {
	return strings.ReplaceAll(query, "@schema", s.quoted)
}

// LockKey derives an advisory lock key (hashed with hashtext) from a
// purpose and the schema, so stores in different schemas never contend.
// The broadcaster's leader lock uses it too.
func (s *Store) LockKey(purpose string) string { return "phasecast:" + s.schema + ":" + purpose }

type migration struct {
	version int
	name    string
	sql     string
}

func loadMigrations() ([]migration, error) {
	entries, err := fs.ReadDir(migrationFiles, "migrations")
	if err != nil {
		return nil, err
	}
	var ms []migration
	for _, e := range entries {
		num, rest, ok := strings.Cut(e.Name(), "_")
		v, err := strconv.Atoi(num)
		if !ok || err != nil {
			return nil, fmt.Errorf("migration file %q is not named NNN_name.up.sql", e.Name())
		}
		body, err := fs.ReadFile(migrationFiles, "migrations/"+e.Name())
		if err != nil {
			return nil, err
		}
		ms = append(ms, migration{version: v, name: strings.TrimSuffix(rest, ".up.sql"), sql: string(body)})
	}
	sort.Slice(ms, func(i, j int) bool { return ms[i].version < ms[j].version })
	return ms, nil
}

// MigrationResult reports what Migrate did.
type MigrationResult struct {
	Applied []int `json:"applied"` // versions applied by this run
	Current int   `json:"current"` // version after this run
}

// Migrate creates or upgrades the store's schema. It runs in one
// transaction under an advisory lock, so concurrent runs are safe and a
// re-run is a no-op.
func (s *Store) Migrate(ctx context.Context) (MigrationResult, error) {
	var res MigrationResult
	ms, err := loadMigrations()
	if err != nil {
		return res, err
	}
	err = s.inTx(ctx, func(tx *sqlx.Tx) error {
		if _, err := tx.ExecContext(ctx, `SELECT pg_advisory_xact_lock(hashtext($1))`, s.LockKey("migrate")); err != nil {
			return err
		}
		for _, q := range []string{
			`CREATE SCHEMA IF NOT EXISTS @schema`,
			`CREATE TABLE IF NOT EXISTS @schema.schema_migrations (
				version    int         PRIMARY KEY,
				name       text        NOT NULL,
				applied_at timestamptz NOT NULL DEFAULT now())`,
		} {
			if _, err := tx.ExecContext(ctx, s.sql(q)); err != nil {
				return err
			}
		}
		var done []int
		if err := tx.SelectContext(ctx, &done, s.sql(`SELECT version FROM @schema.schema_migrations`)); err != nil {
			return err
		}
		applied := make(map[int]bool, len(done))
		for _, v := range done {
			applied[v] = true
			res.Current = max(res.Current, v)
		}
		for _, m := range ms {
			if applied[m.version] {
				continue
			}
			if _, err := tx.ExecContext(ctx, s.sql(m.sql)); err != nil {
				return fmt.Errorf("migration %03d_%s: %w", m.version, m.name, err)
			}
			if _, err := tx.ExecContext(ctx, s.sql(`INSERT INTO @schema.schema_migrations (version, name) VALUES ($1, $2)`), m.version, m.name); err != nil {
				return err
			}
			res.Applied = append(res.Applied, m.version)
			res.Current = m.version
		}
		if len(res.Applied) == 0 {
			return nil
		}
		// A store upgraded to the digest column gets the digest of the
		// state it already holds, so agents confirm cheaply at once.
		return s.sealState(ctx, tx)
	})
	return res, err
}

// ErrNotMigrated means the store's tables do not exist yet, or predate
// this binary.
var ErrNotMigrated = errors.New("the phasecast schema is not set up, or is older than this binary: run 'phasecast migrate' first")

// inTx runs fn in a transaction, committing if it returns nil.
func (s *Store) inTx(ctx context.Context, fn func(*sqlx.Tx) error) error {
	return s.inTxOpts(ctx, nil, fn)
}

func (s *Store) inTxOpts(ctx context.Context, opts *sql.TxOptions, fn func(*sqlx.Tx) error) error {
	tx, err := s.db.BeginTxx(ctx, opts)
	if err != nil {
		return err
	}
	if err := fn(tx); err != nil {
		_ = tx.Rollback()
		return notMigrated(err)
	}
	return notMigrated(tx.Commit())
}

// notMigrated turns "relation (or column) does not exist" on our own tables into
// ErrNotMigrated, which tells the operator what to do. A manifest's own
// statement naming a missing table is the manifest's error, not ours.
func notMigrated(err error) error {
	var expand *ExpandError
	if errors.As(err, &expand) {
		return err
	}
	var pqErr *pq.Error
	// 42P01 undefined table, 3F000 undefined schema, 42703 undefined
	// column: a store migrated by an older binary.
	if errors.As(err, &pqErr) && (pqErr.Code == "42P01" || pqErr.Code == "3F000" || pqErr.Code == "42703") {
		return fmt.Errorf("%w (%s)", ErrNotMigrated, pqErr.Message)
	}
	return err
}

// readOnlySnapshot reads several tables as of one moment.
var readOnlySnapshot = &sql.TxOptions{Isolation: sql.LevelRepeatableRead, ReadOnly: true}
