package schema_test

import (
	"net/url"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/schema"
)

// roleDB creates a login role of the test's own (dropped when the test
// ends) and opens a handle that connects as it to database (the test
// database when empty), with application_name app, holding one session.
func (b *contractBundle) roleDB(role, database, app string) *sqlx.DB {
	b.t.Helper()
	u, err := url.Parse(testenv.DatabaseURL())
	require.NoError(b.t, err)
	u.User = url.User(role)
	if database != "" {
		u.Path = "/" + database
	}
	q := u.Query()
	q.Set("application_name", app)
	u.RawQuery = q.Encode()
	db, err := sqlx.Open("postgres", u.String())
	require.NoError(b.t, err)
	b.t.Cleanup(func() { db.Close() })
	require.NoError(b.t, db.PingContext(b.ctx))
	return db
}

// createRole creates a login role, dropped with its grants when the test
// ends.
func (b *contractBundle) createRole(prefix string) string {
	b.t.Helper()
	role := testenv.Name(prefix)
	b.exec(`CREATE ROLE ` + pq.QuoteIdentifier(role) + ` LOGIN`)
	b.t.Cleanup(func() {
		// Sessions close before the role goes (handles close first: the
		// cleanups run last-registered first).
		_, _ = b.db.Exec(`SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1`, role)
		_, _ = b.db.Exec(`DROP OWNED BY ` + pq.QuoteIdentifier(role))
		_, _ = b.db.Exec(`DROP ROLE ` + pq.QuoteIdentifier(role))
	})
	return role
}

func sessionOf(sessions []schema.Session, app string) (schema.Session, bool) {
	for _, s := range sessions {
		if s.ApplicationName == app {
			return s, true
		}
	}
	return schema.Session{}, false
}

// TestOutsideSessionsScopedToRemovedTables: the runner lists the sessions
// that could touch the removed tables, and says why; not every session on
// the database. A role that cannot use the removed columns, a session in
// another database, or a role that can use only another schema is not
// listed; a role granted one removed column is. Sessions from a pooler
// named in Poolers are listed for a lock or a query on a removed table,
// even under a live agent's application_name, and not for their role.
func TestOutsideSessionsScopedToRemovedTables(t *testing.T) {
	t.Parallel()
	b := setupContract(t)
	b.instances()
	_, epoch := b.toContract(releaseL)
	b.leader()
	agentApp := "svc_" + b.app
	b.agent(agentSpec{id: "a", drained: epoch, releases: []string{"L"}, appName: agentApp})

	// Another schema, with a table the release does not touch.
	other := testenv.Schema(t, b.db, "other")
	b.exec(`CREATE TABLE ` + pq.QuoteIdentifier(other) + `.things (id int)`)
	// Another database.
	otherDB := testenv.Name("db")
	b.exec(`CREATE DATABASE ` + pq.QuoteIdentifier(otherDB))
	t.Cleanup(func() { _, _ = b.db.Exec(`DROP DATABASE ` + pq.QuoteIdentifier(otherDB) + ` WITH (FORCE)`) })

	app := func(what string) string { return what + "_" + b.app }
	nobody := b.createRole("nobody")
	elsewhere := b.createRole("elsewhere")
	reader := b.createRole("reader")
	pooler := b.createRole("pooler")
	q := pq.QuoteIdentifier
	b.exec(
		`GRANT USAGE ON SCHEMA `+q(other)+` TO `+q(elsewhere),
		`GRANT SELECT ON `+q(other)+`.things TO `+q(elsewhere),
		`GRANT USAGE ON SCHEMA APP TO `+q(reader)+`, `+q(pooler),
		`GRANT SELECT (id, name) ON APP.instances TO `+q(reader),
		`GRANT SELECT ON APP.instances TO `+q(pooler),
	)
	b.roleDB(nobody, "", app("nobody"))
	b.roleDB(elsewhere, "", app("elsewhere"))
	b.roleDB(reader, "", app("reader"))
	b.roleDB("postgres", otherDB, app("otherdb"))
	b.roleDB(pooler, "", app("pooled_idle"))
	// A pooled server session running an outsider's query under a live
	// agent's application_name.
	busy := b.roleDB(pooler, "", agentApp)
	// Pooled sessions that only read the table's other columns: one under a
	// live agent's name (a service's own query), one under no agent's.
	calm := b.roleDB(pooler, "", agentApp)
	stranger := b.roleDB(pooler, "", app("pooled_busy"))
	done := make(chan error, 3)
	for _, run := range []struct {
		db    *sqlx.DB
		query string
	}{
		{busy, `SELECT pg_sleep(3), "name" FROM ` + q(b.app) + `.instances LIMIT 1`},
		{calm, `SELECT pg_sleep(3), "id" AS calm FROM ` + q(b.app) + `.instances LIMIT 1`},
		{stranger, `SELECT pg_sleep(3), "id" FROM ` + q(b.app) + `.instances LIMIT 1`},
	} {
		go func() {
			_, err := run.db.ExecContext(b.ctx, run.query)
			done <- err
		}()
	}
	require.Eventually(t, func() bool {
		var n int
		err := b.db.Get(&n, `SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND state = 'active'`, pooler)
		return err == nil && n == 3
	}, 5*time.Second, 10*time.Millisecond)

	plan := func(poolers []string) []schema.Session {
		res, err := b.store.Contract(b.ctx, "L", fast(schema.ContractOptions{DryRun: true, Poolers: poolers}))
		require.NoError(t, err)
		return res.OutsideSessions
	}

	sessions := plan(nil)
	for _, who := range []string{"nobody", "elsewhere", "otherdb"} {
		_, listed := sessionOf(sessions, app(who))
		require.False(t, listed, "%s cannot touch the removed columns: %+v", who, sessions)
	}
	s, listed := sessionOf(sessions, app("reader"))
	require.True(t, listed, "a role granted a removed column is listed")
	require.True(t, s.CanUse)
	require.Contains(t, s.Reasons, `its role "`+reader+`" may use a removed table or column`)
	s, listed = sessionOf(sessions, app("pooled_idle"))
	require.True(t, listed, "without Poolers, an idle session of a role that may read the table is listed")
	_, listed = sessionOf(sessions, agentApp)
	require.False(t, listed, "without Poolers, a live agent's application_name vouches for the session")

	sessions = plan([]string{pooler})
	_, listed = sessionOf(sessions, app("pooled_idle"))
	require.False(t, listed, "an idle pooled session is not listed for its role")
	for _, other := range sessions {
		require.NotContains(t, other.Query, "calm", "a pooled session under a live agent's name that only locks a table losing columns is not listed")
	}
	s, listed = sessionOf(sessions, app("pooled_busy"))
	require.True(t, listed, "a pooled session under no agent's name that locks a removed table is listed")
	require.True(t, s.HoldsLock)
	require.False(t, s.NamesRemoved)
	s, listed = sessionOf(sessions, agentApp)
	require.True(t, listed, "a pooled session naming a removed column is listed whatever its application_name: %+v", sessions)
	require.True(t, s.Pooled)
	require.True(t, s.NamesRemoved)
	require.True(t, s.HoldsLock, "it holds a lock on the table it reads")
	for _, other := range sessions {
		if other.PID == s.PID {
			break
		}
		require.True(t, other.NamesRemoved, "sessions naming removed columns come first: %+v", sessions)
	}
	_, listed = sessionOf(sessions, app("reader"))
	require.True(t, listed, "sessions not from the pooler are judged as before")

	_, err := b.store.Contract(b.ctx, "L", fast(schema.ContractOptions{DryRun: true, Poolers: []string{"10.0.0.0/33"}}))
	require.ErrorContains(t, err, "not an address range")
	for range 3 {
		require.NoError(t, <-done)
	}
}
