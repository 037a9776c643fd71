package schema

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"
)

// Kinds of Principal: who sent a status.
const (
	// PrincipalAMQP is a broker user, as RabbitMQ validated it in the
	// status's user_id property.
	PrincipalAMQP = "amqp"
	// PrincipalDB is a database role, the session_user of agent_sync.
	PrincipalDB = "db"
)

// AnyService in a Principal allows it to enrol agents of every service.
const AnyService = "*"

// Principal is one sender allowed to enrol (create, or take over once its
// lease is over) agents of a service.
type Principal struct {
	Service string    `db:"service" json:"service"`
	Kind    string    `db:"kind" json:"kind"`
	Name    string    `db:"name" json:"name"`
	AddedBy string    `db:"added_by" json:"added_by"`
	AddedAt time.Time `db:"added_at" json:"added_at"`
}

// String is the principal as an agents row's vouched_by names it.
func (p Principal) String() string { return p.Kind + ":" + p.Name }

// ErrBadPrincipal wraps a principal that cannot be allowed or denied.
var ErrBadPrincipal = errors.New("bad principal")

func checkPrincipal(service, kind, name string) error {
	switch {
	case service == "":
		return fmt.Errorf("%w: no service (use %q for every service)", ErrBadPrincipal, AnyService)
	case kind != PrincipalAMQP && kind != PrincipalDB:
		return fmt.Errorf("%w: kind %q (want %q or %q)", ErrBadPrincipal, kind, PrincipalAMQP, PrincipalDB)
	case name == "":
		return fmt.Errorf("%w: no %s name", ErrBadPrincipal, kind)
	}
	return nil
}

// AllowPrincipal lets the broker user or database role name enrol agents
// of service (AnyService: of every service), and audits it. Allowing one
// already allowed changes nothing and is not audited again.
func (s *Store) AllowPrincipal(ctx context.Context, service, kind, name, actor string) error {
	if err := checkPrincipal(service, kind, name); err != nil {
		return err
	}
	return s.inTx(ctx, func(tx *sqlx.Tx) error {
		res, err := tx.ExecContext(ctx, s.sql(`INSERT INTO @schema.principals (service, kind, name, added_by) VALUES ($1, $2, $3, $4)
			ON CONFLICT DO NOTHING`), service, kind, name, actor)
		if err != nil {
			return err
		}
		if n, _ := res.RowsAffected(); n == 0 {
			return nil
		}
		return s.auditAccess(ctx, tx, "allow", kind+":"+name, "service "+service, actor)
	})
}

// AllowOwnRole allows this store connection's own database role
// (session_user) to enrol agents of service: for demos, benchmarks and
// tests, whose agents connect as the role that owns the store.
func (s *Store) AllowOwnRole(ctx context.Context, service, actor string) error {
	var role string
	if err := s.db.GetContext(ctx, &role, `SELECT session_user`); err != nil {
		return err
	}
	return s.AllowPrincipal(ctx, service, PrincipalDB, role, actor)
}

// DenyPrincipal withdraws AllowPrincipal. Rows it enrolled keep working
// while their agents hold their tokens; 'forget' removes one at once. It
// reports whether the principal was allowed.
func (s *Store) DenyPrincipal(ctx context.Context, service, kind, name, actor string) (bool, error) {
	if err := checkPrincipal(service, kind, name); err != nil {
		return false, err
	}
	var found bool
	err := s.inTx(ctx, func(tx *sqlx.Tx) error {
		res, err := tx.ExecContext(ctx, s.sql(`DELETE FROM @schema.principals WHERE service = $1 AND kind = $2 AND name = $3`), service, kind, name)
		if err != nil {
			return err
		}
		if n, _ := res.RowsAffected(); n == 0 {
			return nil
		}
		found = true
		return s.auditAccess(ctx, tx, "deny", kind+":"+name, "service "+service, actor)
	})
	return found, err
}

// Principals lists who may enrol agents, by service.
func (s *Store) Principals(ctx context.Context) ([]Principal, error) {
	var out []Principal
	err := s.db.SelectContext(ctx, &out, s.sql(`SELECT service, kind, name, added_by, added_at FROM @schema.principals ORDER BY service, kind, name`))
	return out, notMigrated(err)
}

// ForgetAgent removes agent id's row and its conflicts, and audits it: for
// a ghost (an ID nobody runs any more, or one enrolled by a principal since
// denied). A live agent that is forgotten enrols again with its next
// status if its principal is still allowed. It reports whether there was
// a row.
func (s *Store) ForgetAgent(ctx context.Context, id, actor string) (bool, error) {
	var found bool
	err := s.inTx(ctx, func(tx *sqlx.Tx) error {
		var vouched string
		err := tx.GetContext(ctx, &vouched, s.sql(`DELETE FROM @schema.agents WHERE id = $1 RETURNING vouched_by`), id)
		if err != nil && !errors.Is(err, sql.ErrNoRows) {
			return err
		}
		found = err == nil
		res, err := tx.ExecContext(ctx, s.sql(`DELETE FROM @schema.agent_conflicts WHERE id = $1`), id)
		if err != nil {
			return err
		}
		if n, _ := res.RowsAffected(); !found && n == 0 {
			return nil
		}
		found = true
		return s.auditAccess(ctx, tx, "forget", id, "vouched by "+vouchedOrNone(vouched), actor)
	})
	return found, err
}

func vouchedOrNone(v string) string {
	if v == "" {
		return "nobody"
	}
	return v
}

// AccessEntry is one row of the access audit: allow, deny, forget.
type AccessEntry struct {
	Action  string    `db:"action" json:"action"`
	Subject string    `db:"subject" json:"subject"`
	Detail  string    `db:"detail" json:"detail,omitempty"`
	Actor   string    `db:"actor" json:"actor"`
	At      time.Time `db:"at" json:"at"`
}

// AccessAudit returns the newest limit access audit rows, newest first.
func (s *Store) AccessAudit(ctx context.Context, limit int) ([]AccessEntry, error) {
	var out []AccessEntry
	err := s.db.SelectContext(ctx, &out, s.sql(`SELECT action, subject, detail, actor, at FROM @schema.access_audit ORDER BY id DESC LIMIT $1`), limit)
	return out, notMigrated(err)
}

func (s *Store) auditAccess(ctx context.Context, tx *sqlx.Tx, action, subject, detail, actor string) error {
	_, err := tx.ExecContext(ctx, s.sql(`INSERT INTO @schema.access_audit (action, subject, detail, actor) VALUES ($1, $2, $3, $4)`),
		action, subject, detail, actor)
	return err
}

// ServiceRoleGrants is the SQL that lets a service's database role run
// its agents through the store path, and nothing more: USAGE on the
// store's schema and EXECUTE on the three functions agents call
// (agent_sync, agent_state, agent_digest), which run as the store's owner
// and apply record_agents' rule with the role as principal. No privilege
// on any table: the role cannot write, or even read, the agents table.
// docs/SECURITY.md gives it for the default schema.
func (s *Store) ServiceRoleGrants(role string) []string {
	r := pq.QuoteIdentifier(role)
	return []string{
		s.sql(`GRANT USAGE ON SCHEMA @schema TO ` + r),
		s.sql(`GRANT EXECUTE ON FUNCTION @schema.agent_sync(jsonb, bytea, bigint), @schema.agent_state(), @schema.agent_digest() TO ` + r),
	}
}
