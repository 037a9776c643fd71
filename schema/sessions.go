package schema

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"sort"
	"strings"

	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"
)

// outsideSessionsQuery reads every client session on this database but the
// runner's own, with what could make it touch the removed tables ($1: JSON
// [{"table": quoted name, "columns": [...]}], tables that still exist):
// whether its role may use one (USAGE on the schema and a privilege on the
// table or, for removed columns, on one of them; superusers may use
// everything), whether it holds or waits for a lock on one, and whether it
// comes from a pooler ($2 addresses or ranges, $3 roles). Sessions of
// other databases are left out: they cannot name these tables.
const outsideSessionsQuery = `
WITH removed AS (
    SELECT c.oid AS rel, c.relnamespace AS nsp, r.columns
    FROM jsonb_to_recordset($1::jsonb) AS r("table" text, columns jsonb)
    JOIN pg_class c ON c.oid = to_regclass(r."table")
)
SELECT a.pid, COALESCE(a.application_name, '') AS application_name, COALESCE(a.usename::text, '') AS usename,
       COALESCE(host(a.client_addr), '') AS client_addr, COALESCE(a.state, '') AS state, COALESCE(a.query, '') AS query,
       EXISTS (
           SELECT 1 FROM removed rm
           WHERE has_schema_privilege(a.usesysid, rm.nsp, 'USAGE')
             AND CASE WHEN jsonb_array_length(rm.columns) = 0
                 THEN has_table_privilege(a.usesysid, rm.rel, 'SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER')
                 ELSE EXISTS (
                     SELECT 1 FROM pg_attribute at
                     WHERE at.attrelid = rm.rel AND at.attnum > 0 AND NOT at.attisdropped
                       AND at.attname IN (SELECT jsonb_array_elements_text(rm.columns))
                       AND has_column_privilege(a.usesysid, rm.rel, at.attnum, 'SELECT, INSERT, UPDATE, REFERENCES'))
                 END) AS can_use,
       EXISTS (SELECT 1 FROM pg_locks l JOIN removed rm ON l.relation = rm.rel
               WHERE l.pid = a.pid AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())) AS holds_lock,
       EXISTS (SELECT 1 FROM pg_locks l JOIN removed rm ON l.relation = rm.rel
               WHERE l.pid = a.pid AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                 AND jsonb_array_length(rm.columns) = 0) AS holds_table_lock,
       COALESCE(a.client_addr <<= ANY ($2::text[]::inet[]) OR a.usename = ANY ($3::text[]), false) AS pooled,
       COALESCE(a.application_name = ANY ($4::text[]), false) AS agent_app,
       COALESCE(a.state = 'idle' AND a.application_name = current_setting('application_name'), false) AS runner_pool
FROM pg_stat_activity a
WHERE a.datname = current_database() AND a.pid <> pg_backend_pid() AND a.backend_type = 'client backend'
ORDER BY a.pid`

// sessionRow is one row of outsideSessionsQuery.
type sessionRow struct {
	Session
	AgentApp       bool `db:"agent_app"`        // application_name of a live agent
	RunnerPool     bool `db:"runner_pool"`      // idle, with the runner's application_name
	HoldsTableLock bool `db:"holds_table_lock"` // a lock on a table removed whole
}

// maxSessionQuery bounds the query text kept for a session.
const maxSessionQuery = 200

// Why a session is listed.
const (
	reasonNamesRemoved = "its query names a removed column or table"
	reasonHoldsLock    = "it holds or waits for a lock on a removed table"
	reasonCanUse       = "its role %q may use a removed table or column"
	reasonPooled       = "a pooled server session (a pooler named by --pooler): listed for its query or its locks, not its role"
)

// listSessions lists the sessions outside any live agent that could touch
// the removed tables, each with the reasons it is listed, those naming a
// removed column first. A session of a live agent (its application_name)
// or the runner's idle pool is left out, unless it comes from a pooler:
// a pooled server session carries the application_name of whichever
// client used it last, so it is judged by its query and its locks (on a
// table removed whole, or on any removed table when no live agent's name
// is on it), and not listed merely because the pooler's role may read the
// tables.
func (s *Store) listSessions(ctx context.Context, conn *sqlx.Conn, res *ContractResult, m *Manifest, agents []Agent, opts ContractOptions) error {
	// Never nil: a nil pq.StringArray is SQL NULL.
	appNames := []string{}
	for _, a := range agents {
		if a.AppName != "" {
			appNames = append(appNames, a.AppName)
		}
	}
	addrs, roles, err := parsePoolers(opts.Poolers)
	if err != nil {
		return err
	}
	type removal struct {
		Table   string   `json:"table"`
		Columns []string `json:"columns"`
	}
	removed := make([]removal, len(m.Removed))
	for i, r := range m.Removed {
		removed[i] = removal{Table: r.QuotedTable(), Columns: append([]string{}, r.Columns...)}
	}
	removedJSON, err := json.Marshal(removed)
	if err != nil {
		return err
	}
	var rows []sessionRow
	if err := conn.SelectContext(ctx, &rows, outsideSessionsQuery, jsonParam(removedJSON),
		pq.StringArray(addrs), pq.StringArray(roles), pq.StringArray(appNames)); err != nil {
		return err
	}
	sessions := []Session{}
	for _, r := range rows {
		sess := r.Session
		sess.NamesRemoved = namesRemoved(sess.Query, m)
		switch {
		case sess.Pooled:
			// A lock on a table that only loses columns is what every
			// service querying it holds: it counts only when no live
			// agent's name is on the session.
			if !sess.NamesRemoved && !r.HoldsTableLock && !(sess.HoldsLock && !r.AgentApp) {
				continue
			}
		case r.AgentApp || r.RunnerPool:
			continue
		case !sess.CanUse && !sess.HoldsLock && !sess.NamesRemoved:
			continue
		}
		sess.Reasons = sessionReasons(sess)
		if q := []rune(sess.Query); len(q) > maxSessionQuery {
			sess.Query = string(q[:maxSessionQuery])
		}
		sessions = append(sessions, sess)
	}
	rank := func(s Session) int {
		switch {
		case s.NamesRemoved:
			return 0
		case s.HoldsLock:
			return 1
		}
		return 2
	}
	sort.SliceStable(sessions, func(i, j int) bool { return rank(sessions[i]) < rank(sessions[j]) })
	res.OutsideSessions = sessions
	return nil
}

func sessionReasons(s Session) []string {
	var reasons []string
	if s.NamesRemoved {
		reasons = append(reasons, reasonNamesRemoved)
	}
	if s.HoldsLock {
		reasons = append(reasons, reasonHoldsLock)
	}
	if s.CanUse && !s.Pooled {
		reasons = append(reasons, fmt.Sprintf(reasonCanUse, s.User))
	}
	if s.Pooled {
		reasons = append(reasons, reasonPooled)
	}
	return reasons
}

// parsePoolers splits ContractOptions.Poolers into client addresses or
// ranges and role names: an entry that parses as an IP address or a CIDR
// range is an address, any other a role; an entry with a "/" that is no
// CIDR range is an error.
func parsePoolers(poolers []string) (addrs, roles []string, err error) {
	addrs, roles = []string{}, []string{}
	for _, p := range poolers {
		p = strings.TrimSpace(p)
		switch {
		case p == "":
			return nil, nil, fmt.Errorf("ContractOptions.Poolers: an empty entry: name a pooler's address (10.0.0.5, 10.0.0.0/24) or its role")
		case net.ParseIP(p) != nil:
			addrs = append(addrs, p)
		case strings.Contains(p, "/"):
			if _, _, err := net.ParseCIDR(p); err != nil {
				return nil, nil, fmt.Errorf("ContractOptions.Poolers: %q is not an address range: %w", p, err)
			}
			addrs = append(addrs, p)
		default:
			roles = append(roles, p)
		}
	}
	return addrs, roles, nil
}
