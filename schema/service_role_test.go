package schema_test

import (
	"context"
	"errors"
	"net/url"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/internal/wire"
	"github.com/phasecast/phasecast/schema"
)

// serviceRole creates a login role with only the store grants a service
// needs (Store.ServiceRoleGrants), allowed to enrol agents of service, and
// returns the store as that role sees it.
func serviceRole(t *testing.T, owner *schema.Store, service string) (*schema.Store, string) {
	t.Helper()
	ctx := context.Background()
	role := testenv.Name("svc")
	_, err := owner.DB().ExecContext(ctx, `CREATE ROLE `+pq.QuoteIdentifier(role)+` LOGIN`)
	require.NoError(t, err)
	t.Cleanup(func() {
		_, _ = owner.DB().Exec(`DROP OWNED BY ` + pq.QuoteIdentifier(role))
		_, _ = owner.DB().Exec(`DROP ROLE IF EXISTS ` + pq.QuoteIdentifier(role))
	})
	for _, q := range owner.ServiceRoleGrants(role) {
		_, err := owner.DB().ExecContext(ctx, q)
		require.NoError(t, err, q)
	}
	require.NoError(t, owner.AllowPrincipal(ctx, service, schema.PrincipalDB, role, "test"))
	u, err := url.Parse(testenv.DatabaseURL())
	require.NoError(t, err)
	u.User = url.User(role)
	db, err := sqlx.Open("postgres", u.String())
	require.NoError(t, err)
	t.Cleanup(func() { db.Close() })
	store, err := schema.NewStore(db, owner.Schema())
	require.NoError(t, err)
	return store, role
}

// TestDirectSQLUpsertFromAServiceRoleIsDenied replays the store-path
// attack: a service's database role writing the agents table in plain SQL
// to acknowledge for another service's agent. With the grants the store
// documents the role has no privilege on any table (permission denied);
// through agent_sync it can run its own agents, but it cannot change
// another agent's row, and the runner keeps waiting for that agent.
func TestDirectSQLUpsertFromAServiceRoleIsDenied(t *testing.T) {
	t.Parallel()
	f := newTrustFixture(t)
	glance, role := serviceRole(t, f.store, "glance")
	ctx := f.ctx
	before := f.row(t, f.victim.AgentID)
	q := pq.QuoteIdentifier(f.store.Schema())

	for _, stmt := range []string{
		`UPDATE ` + q + `.agents SET drained_epoch = drained_epoch + 1, lease_expires_at = now() WHERE id = 'nova-api-1'`,
		`INSERT INTO ` + q + `.agents (id, service, host, pid, seq, applied_epoch, drained_epoch, last_seen, lease_expires_at)
			VALUES ('ghost', 'nova', 'h', 1, 1, 0, 0, now(), now() + interval '1 hour')`,
		`DELETE FROM ` + q + `.agents`,
		`SELECT * FROM ` + q + `.agents`,
		`INSERT INTO ` + q + `.principals (service, kind, name, added_by) VALUES ('*', 'db', '` + role + `', 'me')`,
		`SELECT * FROM ` + q + `.record_agents('[]', 1000, true)`,
	} {
		_, err := glance.DB().ExecContext(ctx, stmt)
		var pqErr *pq.Error
		require.True(t, errors.As(err, &pqErr), "%s: got %v", stmt, err)
		require.Equal(t, pq.ErrorCode("42501"), pqErr.Code, "%s: %v", stmt, err)
	}
	f.requireVictimUnchanged(t, before)

	// The functions work for the role's own agents.
	own := testenv.Credentials(wire.Status{V: wire.StatusVersion, Kind: wire.KindStatus, AgentID: "glance-api-1", Service: "glance",
		Host: "g", PID: 5, Seq: 1, SentAt: time.Now()})
	state, err := glance.SyncAgent(ctx, own, time.Minute)
	require.NoError(t, err)
	require.Equal(t, f.epoch, state.Epoch)
	_, err = glance.State(ctx)
	require.NoError(t, err)
	_, err = glance.StateDigest(ctx)
	require.NoError(t, err)
	require.Equal(t, "db:"+role, f.row(t, own.AgentID).VouchedBy)

	// But not for another service's agent: the victim's goodbye, a
	// takeover by another incarnation, or a new agent of nova.
	bye := f.victim
	bye.Seq, bye.Leaving, bye.Token = bye.Seq+1, true, own.Token
	rival := testenv.Credentials(wire.Status{AgentID: f.victim.AgentID, Incarnation: "glance-rival", Service: "nova", Host: "g", PID: 6, Seq: 1, SentAt: time.Now()})
	novaGhost := testenv.Credentials(wire.Status{AgentID: "nova-ghost", Service: "nova", Host: "g", PID: 7, Seq: 1, SentAt: time.Now()})
	for _, st := range []wire.Status{bye, rival, novaGhost} {
		_, err := glance.SyncAgent(ctx, st, time.Minute)
		var ignored *schema.StatusIgnoredError
		require.True(t, errors.As(err, &ignored), "%s: got %v", st.AgentID, err)
		require.Equal(t, schema.RefusedUnauthenticated, ignored.Refused, st.AgentID)
	}
	f.requireVictimUnchanged(t, before)
	require.Nil(t, f.row(t, novaGhost.AgentID))
	n, err := f.store.CountAcked(ctx, "L", f.epoch, "nova-")
	require.NoError(t, err)
	require.Equal(t, 1, n)
}
