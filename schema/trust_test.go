package schema_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/internal/wire"
	"github.com/phasecast/phasecast/schema"
)

// trustFixture is a store with one live victim agent, enrolled by the
// broker user "nova" allowed for service nova, that acknowledged epoch.
type trustFixture struct {
	ctx    context.Context
	store  *schema.Store
	victim wire.Status
	epoch  int64
}

func newTrustFixture(t *testing.T) *trustFixture {
	t.Helper()
	f := &trustFixture{ctx: context.Background(), store: testenv.Store(t)}
	require.NoError(t, f.store.AllowPrincipal(f.ctx, "nova", schema.PrincipalAMQP, "nova", "test"))
	require.NoError(t, f.store.AllowPrincipal(f.ctx, "glance", schema.PrincipalAMQP, "glance", "test"))
	var err error
	f.epoch, err = f.store.Epoch(f.ctx)
	require.NoError(t, err)
	f.victim = testenv.Credentials(wire.Status{V: wire.StatusVersion, Kind: wire.KindStatus, AgentID: "nova-api-1", Incarnation: "victim",
		Service: "nova", Host: "nova-host", PID: 100, Releases: []string{"L"}, Seq: 1000,
		AppliedEpoch: f.epoch, DrainedEpoch: f.epoch, SentAt: time.Now()})
	rec := f.send(t, "amqp:nova", time.Minute, f.victim)
	require.True(t, rec.Has(f.victim.AgentID, f.victim.Incarnation), "the victim enrols")
	return f
}

func (f *trustFixture) send(t *testing.T, principal string, lease time.Duration, statuses ...wire.Status) schema.Recorded {
	t.Helper()
	batch := make([]schema.Sent, len(statuses))
	for i, st := range statuses {
		batch[i] = schema.Sent{Status: st, Principal: principal}
	}
	rec, err := f.store.RecordSent(f.ctx, batch, lease, false)
	require.NoError(t, err)
	return rec
}

// row reads an agent's row, nil when it has none.
func (f *trustFixture) row(t *testing.T, id string) *schema.Agent {
	t.Helper()
	agents, err := f.store.Agents(f.ctx)
	require.NoError(t, err)
	for i := range agents {
		if agents[i].ID == id {
			return &agents[i]
		}
	}
	return nil
}

// requireVictimUnchanged checks the victim's row is as its own last
// status left it, and still live: a runner waits for it.
func (f *trustFixture) requireVictimUnchanged(t *testing.T, before *schema.Agent) {
	t.Helper()
	after := f.row(t, f.victim.AgentID)
	require.NotNil(t, after, "the victim's row is gone")
	require.True(t, after.Live(), "the victim's lease ended")
	require.Equal(t, before.Seq, after.Seq, "the victim's seq moved")
	require.Equal(t, before.PID, after.PID, "the victim's pid changed")
	require.Equal(t, before.Host, after.Host)
	require.Equal(t, before.Incarnation, after.Incarnation)
	require.Equal(t, before.DrainedEpoch, after.DrainedEpoch)
	require.Equal(t, before.VouchedBy, after.VouchedBy)
	require.False(t, after.LeaseExpiresAt.Before(before.LeaseExpiresAt), "the victim's lease moved earlier")
	require.Empty(t, after.Rivals, "the attack was kept as a conflict")
}

func refusedAs(rec schema.Recorded, reason string) bool {
	return len(rec.Refused) > 0 && rec.Refused[0].Reason == reason
}

// TestForgedGoodbyeChangesNothing: a goodbye (leaving) for a live agent
// from anyone without that agent's token (no token, another token, the
// same incarnation, an allowed principal of its own service) is refused;
// the victim stays live, so a runner still waits for it.
func TestForgedGoodbyeChangesNothing(t *testing.T) {
	t.Parallel()
	f := newTrustFixture(t)
	before := f.row(t, f.victim.AgentID)

	bye := f.victim
	bye.Seq, bye.Leaving, bye.PID = bye.Seq+1, true, 666
	noToken := bye
	noToken.Token = ""
	otherToken := testenv.Credentials(wire.Status{AgentID: "attacker", Incarnation: "victim"}).Token
	wrongToken := bye
	wrongToken.Token = otherToken
	for _, principal := range []string{"", "amqp:nova", "amqp:glance", "amqp:stranger"} {
		for _, st := range []wire.Status{noToken, wrongToken} {
			rec := f.send(t, principal, 0, st)
			require.Empty(t, rec.Kept, "a goodbye without the victim's token was recorded (principal %q)", principal)
			require.True(t, refusedAs(rec, schema.RefusedUnauthenticated), "refused as unauthenticated: %+v", rec)
			f.requireVictimUnchanged(t, before)
		}
	}
	// The owner's own path (RecordStatusBatch) applies the same rule.
	_, err := f.store.RecordStatusBatch(f.ctx, []wire.Status{wrongToken}, 0)
	require.NoError(t, err)
	f.requireVictimUnchanged(t, before)
	n, err := f.store.CountAcked(f.ctx, "L", f.epoch, "")
	require.NoError(t, err)
	require.Equal(t, 1, n)

	// The victim's own goodbye still ends its lease.
	rec := f.send(t, "", 0, func() wire.Status { s := f.victim; s.Seq += 2; s.Leaving = true; return s }())
	require.True(t, rec.Has(f.victim.AgentID, f.victim.Incarnation))
	require.False(t, f.row(t, f.victim.AgentID).Live())
}

// TestSeqLockOutIsRefused: a far-future seq is refused, not recorded,
// whoever sends it: without the victim's token it is unauthenticated; even
// with it, more than 2^40 ahead is refused. The victim's next real status
// is recorded and earns its lease.
func TestSeqLockOutIsRefused(t *testing.T) {
	t.Parallel()
	f := newTrustFixture(t)
	before := f.row(t, f.victim.AgentID)

	forged := f.victim
	forged.Seq, forged.PID = uint64(time.Now().UnixNano())<<1, 666
	forged.Token = testenv.Credentials(wire.Status{AgentID: "attacker", Incarnation: "victim"}).Token
	rec := f.send(t, "amqp:nova", time.Minute, forged)
	require.Empty(t, rec.Kept, "a far-future seq without the token was recorded")
	require.True(t, refusedAs(rec, schema.RefusedUnauthenticated))
	f.requireVictimUnchanged(t, before)

	// With the token (a buggy agent, or one whose token leaked): bounded.
	far := f.victim
	far.Seq = f.victim.Seq + schema.MaxSeqStep + 1
	rec = f.send(t, "amqp:nova", time.Minute, far)
	require.Empty(t, rec.Kept, "a seq more than 2^40 ahead was recorded")
	require.True(t, refusedAs(rec, schema.RefusedSeqBound))
	f.requireVictimUnchanged(t, before)

	next := f.victim
	next.Seq++
	rec = f.send(t, "amqp:nova", time.Minute, next)
	require.True(t, rec.Has(next.AgentID, next.Incarnation), "the victim's next status was ignored: locked out")
	require.Equal(t, int64(next.Seq), f.row(t, next.AgentID).Seq)
	// Right at the bound is still news.
	edge := next
	edge.Seq += schema.MaxSeqStep
	require.True(t, f.send(t, "amqp:nova", time.Minute, edge).Has(edge.AgentID, edge.Incarnation))
}

// TestGhostHeartbeatsNeedAnAllowedPrincipal: a status for a made-up ID,
// or for a dead agent's ID, creates or revives no row unless its sender is
// allowed for the service; with no principal at all, never. An allowed
// principal's ghost shows who vouches for it, and forget removes it,
// audited.
func TestGhostHeartbeatsNeedAnAllowedPrincipal(t *testing.T) {
	t.Parallel()
	f := newTrustFixture(t)

	ghost := testenv.Credentials(wire.Status{AgentID: "nova-ghost", Service: "nova", Host: "nowhere", PID: 1, Seq: 1,
		Releases: []string{"K"}, SentAt: time.Now()})
	for _, principal := range []string{"", "amqp:stranger", "amqp:glance", "db:nobody"} {
		rec := f.send(t, principal, time.Minute, ghost)
		require.Empty(t, rec.Kept, "principal %q created a ghost", principal)
		require.Nil(t, f.row(t, ghost.AgentID), "principal %q created a row", principal)
	}

	// A dead ID is not revived by a stranger, nor taken over by another
	// service's principal, even one claiming that service.
	bye := f.victim
	bye.Seq, bye.Leaving = bye.Seq+1, true
	require.True(t, f.send(t, "", 0, bye).Has(bye.AgentID, bye.Incarnation))
	dead := f.row(t, bye.AgentID)
	require.False(t, dead.Live())
	revive := testenv.Credentials(wire.Status{AgentID: f.victim.AgentID, Incarnation: "ghost", Service: "nova", Host: "nowhere", PID: 2,
		Seq: 1, Releases: []string{"L"}, AppliedEpoch: f.epoch, DrainedEpoch: f.epoch, SentAt: time.Now()})
	asGlance := revive
	asGlance.Service = "glance"
	asGlance = testenv.Credentials(asGlance)
	for principal, st := range map[string]wire.Status{"": revive, "amqp:stranger": revive, "amqp:glance": asGlance} {
		rec := f.send(t, principal, time.Minute, st)
		require.Empty(t, rec.Kept, "principal %q revived a dead ID", principal)
		require.False(t, f.row(t, bye.AgentID).Live(), "principal %q revived a dead ID", principal)
	}

	// An allowed principal may: and status shows who vouches.
	rec := f.send(t, "amqp:nova", time.Minute, revive)
	require.True(t, rec.Has(revive.AgentID, revive.Incarnation))
	require.Equal(t, "amqp:nova", f.row(t, revive.AgentID).VouchedBy)

	found, err := f.store.ForgetAgent(f.ctx, revive.AgentID, "alice")
	require.NoError(t, err)
	require.True(t, found)
	require.Nil(t, f.row(t, revive.AgentID))
	audit, err := f.store.AccessAudit(f.ctx, 1)
	require.NoError(t, err)
	require.Len(t, audit, 1)
	require.Equal(t, "forget", audit[0].Action)
	require.Equal(t, revive.AgentID, audit[0].Subject)
	require.Equal(t, "alice", audit[0].Actor)
	require.Contains(t, audit[0].Detail, "amqp:nova")
	found, err = f.store.ForgetAgent(f.ctx, revive.AgentID, "alice")
	require.NoError(t, err)
	require.False(t, found)
}

// TestUnauthenticatedStatusNeverCreatesARow: a status without a token, or
// without an incarnation, creates no row whoever sends it, even the
// store's owner, and is counted as refused.
func TestUnauthenticatedStatusNeverCreatesARow(t *testing.T) {
	t.Parallel()
	f := newTrustFixture(t)
	st := wire.Status{AgentID: "new-1", Incarnation: "i", Service: "nova", Host: "h", PID: 1, Seq: 1, SentAt: time.Now()}
	noIncarnation := testenv.Credentials(st)
	noIncarnation.Incarnation = ""
	for _, s := range []wire.Status{st, noIncarnation} {
		rec := f.send(t, "amqp:nova", time.Minute, s)
		require.Empty(t, rec.Kept)
		require.True(t, refusedAs(rec, schema.RefusedUnauthenticated))
		rec, err := f.store.RecordStatusBatch(f.ctx, []wire.Status{s}, time.Minute)
		require.NoError(t, err)
		require.Empty(t, rec.Kept)
		require.Nil(t, f.row(t, s.AgentID))
	}
}

// TestOtherServiceCannotClaimAnID: a principal allowed for one service
// cannot hold another service's live agent back with a conflict (which
// would keep the ID unacknowledged), nor enrol an agent of a service it is
// not allowed for.
func TestOtherServiceCannotClaimAnID(t *testing.T) {
	t.Parallel()
	f := newTrustFixture(t)
	before := f.row(t, f.victim.AgentID)
	rival := testenv.Credentials(wire.Status{AgentID: f.victim.AgentID, Incarnation: "rival", Service: "nova", Host: "x", PID: 9, Seq: 1, SentAt: time.Now()})
	rec := f.send(t, "amqp:glance", time.Minute, rival)
	require.Empty(t, rec.Conflicts, "another service's principal made a conflict")
	require.True(t, refusedAs(rec, schema.RefusedUnauthenticated))
	f.requireVictimUnchanged(t, before)
	n, err := f.store.CountAcked(f.ctx, "L", f.epoch, "")
	require.NoError(t, err)
	require.Equal(t, 1, n, "the victim no longer counts as acknowledged")

	// The victim's own service's principal: a conflict, as before.
	rec = f.send(t, "amqp:nova", time.Minute, rival)
	require.Len(t, rec.Conflicts, 1)
}

// TestSyncAgentRefusesAnotherAgentsRow: through agent_sync, the store
// path, a status without the row's token changes nothing and says why.
func TestSyncAgentRefusesAnotherAgentsRow(t *testing.T) {
	t.Parallel()
	f := newTrustFixture(t)
	before := f.row(t, f.victim.AgentID)
	forged := f.victim
	forged.Seq, forged.Leaving = forged.Seq+1, true
	forged.Token = strings.Repeat("0", 2*wire.TokenSize)
	state, err := f.store.SyncAgent(f.ctx, forged, time.Minute)
	var ignored *schema.StatusIgnoredError
	require.True(t, errors.As(err, &ignored), "got %v", err)
	require.Equal(t, schema.RefusedUnauthenticated, ignored.Refused)
	require.Empty(t, ignored.HolderHost, "a refused caller learnt about the holder")
	require.ErrorContains(t, err, "unauthenticated")
	require.Equal(t, f.epoch, state.Epoch, "the state is read all the same")
	f.requireVictimUnchanged(t, before)
}

// TestMalformedTokenNeverCreatesARow: a token enrols only as 64 lowercase
// hex digits (migration 010 tests it without a regular expression): one
// digit short or long, upper case, a non-hex letter, a trailing newline or
// a non-ASCII digit is refused and creates no row, while the same status
// with its well-formed token enrols.
func TestMalformedTokenNeverCreatesARow(t *testing.T) {
	t.Parallel()
	f := newTrustFixture(t)
	good := testenv.Credentials(wire.Status{AgentID: "new-tok", Incarnation: "i", Service: "nova", Host: "h", PID: 1, Seq: 1, SentAt: time.Now()})
	for name, token := range map[string]string{
		"short":      good.Token[:63],
		"long":       good.Token + "0",
		"upper case": strings.Repeat("A", 64),
		"non-hex":    "g" + good.Token[1:],
		"newline":    good.Token[:63] + "\n",
		"non-ASCII":  "٣" + good.Token[1:], // 64 characters, 65 bytes
	} {
		st := good
		st.Token = token
		rec := f.send(t, "amqp:nova", time.Minute, st)
		require.Empty(t, rec.Kept, name)
		require.True(t, refusedAs(rec, schema.RefusedUnauthenticated), name)
		require.Nil(t, f.row(t, st.AgentID), name)
	}
	rec := f.send(t, "amqp:nova", time.Minute, good)
	require.True(t, rec.Has(good.AgentID, good.Incarnation), "the well-formed token enrols")
}
