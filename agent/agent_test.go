package agent

import (
	"context"
	"crypto/ed25519"
	"database/sql"
	"encoding/json"
	"io"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/faultproxy"
	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/internal/wire"
	"github.com/phasecast/phasecast/schema"
)

func TestStart(t *testing.T) {
	t.Parallel()

	t.Run("LoadsStateFromDB", func(t *testing.T) {
		t.Parallel()
		b := setup(t, fakeOptions{noBeacons: true})
		applyRelease(t, b.store, manifestL)
		epoch := flip(t, b.store, "L", phase.Migrate, phase.Contract)

		cfg := b.config(t, true)
		a := startAgent(t, cfg)
		s := a.Snapshot()
		require.Equal(t, epoch, s.Epoch(), "no beacon was sent: the state came from the store")
		require.True(t, s.Removed("instances", "name"))
		require.False(t, a.Stats().Fenced)

		// Start registered the agent, and its statuses reach the store.
		require.Eventually(t, func() bool {
			row := agentRow(t, b.store, a.ID())
			return row.DrainedEpoch == epoch && row.Live()
		}, 5*time.Second, 10*time.Millisecond)
		row := agentRow(t, b.store, a.ID())
		require.Equal(t, DefaultApplicationName(a.ID()), row.AppName)
		require.Equal(t, "phasecast:"+a.ID(), row.AppName)
		require.Equal(t, []string{"L"}, []string(row.Releases))
		require.Equal(t, "27.1.0", row.Version)
		require.True(t, strings.HasPrefix(a.ID(), "nova-api-"), a.ID())
	})

	t.Run("WithoutDBWaitsForBeacon", func(t *testing.T) {
		t.Parallel()
		b := setup(t, fakeOptions{noBeacons: true})
		applyRelease(t, b.store, manifestL)
		epoch := flip(t, b.store, "L", phase.Migrate)

		a, err := New(b.config(t, false))
		require.NoError(t, err)
		t.Cleanup(func() { stopAgent(t, a) })
		done := make(chan error, 1)
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			defer cancel()
			done <- a.Start(ctx)
		}()
		select {
		case err := <-done:
			require.FailNow(t, "Start returned before any state arrived", "err: %v", err)
		case <-time.After(600 * time.Millisecond):
		}
		require.Nil(t, a.Snapshot())
		_, err = a.Enter()
		require.ErrorIs(t, err, ErrStale)

		b.fake.setBeacons(true)
		select {
		case err := <-done:
			require.NoError(t, err)
		case <-time.After(10 * time.Second):
			require.FailNow(t, "Start did not return after beacons began")
		}
		require.Equal(t, epoch, a.Snapshot().Epoch())
		require.False(t, a.Stats().Fenced)
		g, err := a.Enter()
		require.NoError(t, err)
		g.Exit()
	})

	t.Run("WithDBBrokerUnreachable", func(t *testing.T) {
		t.Parallel()
		b := setup(t, fakeOptions{})
		epoch := applyRelease(t, b.store, manifestL)
		cfg := b.config(t, true)
		cfg.AMQPURL = "amqp://guest:hunter2@127.0.0.1:1/"
		cfg.InitialLease = 600 * time.Millisecond
		var logs testenv.LogBuffer
		cfg.Logger = cfg.Logger.Output(io.MultiWriter(zerolog.NewTestWriter(t), &logs))
		a := startAgent(t, cfg)
		require.Equal(t, epoch, a.Snapshot().Epoch())
		g, err := a.Enter()
		require.NoError(t, err)
		g.Exit()

		// Without the broker the lease lives on through the store: the
		// heartbeats renew it there, and a flip arrives the same way.
		r0 := a.Stats().Resyncs
		epoch = flip(t, b.store, "L", phase.Migrate)
		waitEpoch(t, a, epoch)
		require.Eventually(t, func() bool {
			row := agentRow(t, b.store, a.ID())
			return row.DrainedEpoch == epoch && row.Live()
		}, 5*time.Second, 10*time.Millisecond)
		require.Greater(t, a.Stats().Resyncs, r0)
		time.Sleep(cfg.InitialLease)
		row := agentRow(t, b.store, a.ID())
		require.True(t, row.Live())
		g, err = a.Enter()
		require.NoError(t, err)
		g.Exit()
		require.Contains(t, logs.String(), "127.0.0.1:1", "the failed dials are logged")
		require.NotContains(t, logs.String(), "hunter2", "never a password")
	})

	t.Run("RestartUnderFixedID", func(t *testing.T) {
		t.Parallel()
		b := setup(t, fakeOptions{})
		applyRelease(t, b.store, manifestL)
		cfg := b.config(t, true)
		cfg.ID = "nova-api-pod-0" // as a StatefulSet would name it
		first := startAgent(t, cfg)
		time.Sleep(3 * cfg.HeartbeatInterval)
		stopAgent(t, first)
		before := agentRow(t, b.store, cfg.ID)

		// The successor's statuses must not be taken for replays of its
		// predecessor's: its very first sync through the store is recorded
		// and renews the lease. (No broker, so Start returns right after
		// that sync.)
		cfg.AMQPURL = "amqp://guest:guest@127.0.0.1:1/"
		second := startAgent(t, cfg)
		require.Greater(t, second.Stats().Seq, first.Stats().Seq)
		after := agentRow(t, b.store, cfg.ID)
		require.Greater(t, after.Seq, before.Seq)
		require.True(t, after.LeaseExpiresAt.After(before.LeaseExpiresAt))
	})

	t.Run("WithoutDBTimesOut", func(t *testing.T) {
		t.Parallel()
		b := setup(t, fakeOptions{noBeacons: true, noAnswer: true})
		a, err := New(b.config(t, false))
		require.NoError(t, err)
		ctx, cancel := context.WithTimeout(context.Background(), 400*time.Millisecond)
		defer cancel()
		err = a.Start(ctx)
		require.ErrorIs(t, err, context.DeadlineExceeded)
		require.ErrorContains(t, err, "beacon")
		require.True(t, a.Stats().Fenced)
		_, err = a.Enter()
		require.ErrorIs(t, err, ErrStale)
		require.NoError(t, a.Stop(context.Background()), "Stop after a failed Start does nothing")
	})
}

func TestColumnsFollowPhases(t *testing.T) {
	t.Parallel()
	b := setup(t, fakeOptions{noBeacons: true})
	applyRelease(t, b.store, manifestL)
	applyRelease(t, b.store, manifestQ)
	a := startAgent(t, b.config(t, true))
	inst, nova := a.Table("instances"), a.Table("nova.instances")
	inv, legacy := a.Table("Billing.invoices"), a.Table("legacy_flavors")

	s := a.Snapshot()
	require.Equal(t, []string{"id", "name", "display_name", "common_name"}, s.Columns(inst))
	require.Equal(t, `"id", "name", "display_name", "common_name"`, s.SelectList(inst))
	require.Equal(t, `"id", "Name", "display name", "host"`, s.SelectList(nova))
	require.Equal(t, `"id", "amount"`, s.SelectList(inv))
	p, ok := s.Phase("2024.06-q")
	require.True(t, ok)
	require.Equal(t, phase.Expand, p)

	// Migrate hides nothing yet.
	epoch := flip(t, b.store, "2024.06-q", phase.Migrate)
	b.fake.publishNow()
	waitEpoch(t, a, epoch)
	require.Equal(t, `"id", "Name", "display name", "host"`, a.Snapshot().SelectList(nova))

	epoch = flip(t, b.store, "2024.06-q", phase.Contract)
	b.fake.publishNow()
	waitEpoch(t, a, epoch)
	s = a.Snapshot()
	require.Equal(t, []string{"id", "host"}, s.Columns(nova))
	require.Equal(t, `"id", "host"`, s.SelectList(nova))
	require.True(t, s.Removed("nova.instances", "Name"))
	require.True(t, s.Removed("nova.instances", "display name"))
	require.False(t, s.Removed("nova.instances", "name"), "identifiers are case-sensitive")
	require.False(t, s.Removed("instances", "Name"), "a removal names its table as the manifest spells it")
	require.True(t, s.TableRemoved(inv))
	require.Empty(t, s.Columns(inv))
	require.Empty(t, s.SelectList(inv))
	require.True(t, s.Removed("Billing.invoices", "amount"))
	require.True(t, s.Removed("Billing.invoices", ""))
	require.Equal(t, `"id", "name", "display_name", "common_name"`, s.SelectList(inst), "L is still in expand")

	epoch = flip(t, b.store, "L", phase.Migrate, phase.Contract)
	b.fake.publishNow()
	waitEpoch(t, a, epoch)
	s = a.Snapshot()
	require.Equal(t, []string{"id", "common_name"}, s.Columns(inst))
	require.Equal(t, `"id", "common_name"`, s.SelectList(inst))
	require.True(t, s.TableRemoved(legacy))

	// The one rollback brings the columns back.
	res, err := b.store.Rollback(context.Background(), "L", schema.FlipOptions{Actor: "test"})
	require.NoError(t, err)
	b.fake.publishNow()
	waitEpoch(t, a, res.Epoch)
	s = a.Snapshot()
	require.Equal(t, `"id", "name", "display_name", "common_name"`, s.SelectList(inst))
	require.False(t, s.TableRemoved(legacy))
	require.Equal(t, []string{"id", "host"}, s.Columns(nova), "the other release is still in contract")
}

func TestGuardDelaysAck(t *testing.T) {
	t.Parallel()
	b := setup(t, fakeOptions{lease: 10 * time.Second, noBeacons: true})
	applyRelease(t, b.store, manifestL)
	e1 := flip(t, b.store, "L", phase.Migrate)

	cfg := b.config(t, true)
	// Heartbeats far apart: a status with the new drained epoch soon after
	// Exit can only be the acknowledgement.
	cfg.HeartbeatInterval = 5 * time.Second
	var agent atomic.Pointer[Agent]
	var seen atomic.Pointer[[3]int64] // old epoch, new epoch, drained epoch during OnChange
	cfg.OnChange = func(old, cur *Snapshot) {
		seen.Store(&[3]int64{old.Epoch(), cur.Epoch(), agent.Load().Stats().DrainedEpoch})
	}
	a, err := New(cfg)
	require.NoError(t, err)
	agent.Store(a)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	require.NoError(t, a.Start(ctx))
	t.Cleanup(func() { stopAgent(t, a) })

	g, err := a.Enter()
	require.NoError(t, err)
	require.Equal(t, e1, g.Snapshot().Epoch())

	e2 := flip(t, b.store, "L", phase.Contract)
	b.fake.publishNow()
	waitEpoch(t, a, e2)
	require.True(t, a.Snapshot().Removed("instances", "name"))
	require.False(t, g.Snapshot().Removed("instances", "name"), "a guard's snapshot never changes")

	// New work runs on the new snapshot and does not hold the ack back.
	g2, err := a.Enter()
	require.NoError(t, err)
	require.Equal(t, e2, g2.Snapshot().Epoch())
	g2.Exit()

	n := len(b.fake.received())
	time.Sleep(400 * time.Millisecond)
	st := a.Stats()
	require.Equal(t, e1, st.DrainedEpoch, "the open guard holds the ack back")
	require.Equal(t, int64(1), st.Inflight)
	for _, s := range b.fake.received()[n:] {
		require.Less(t, s.DrainedEpoch, e2)
	}
	require.Eventually(t, func() bool { return seen.Load() != nil }, 5*time.Second, 5*time.Millisecond)
	require.Equal(t, [3]int64{e1, e2, e1}, *seen.Load(), "OnChange runs after the swap and before the ack")

	n = len(b.fake.received())
	exited := time.Now()
	g.Exit()
	ack := b.fake.waitStatus(t, n, 3*time.Second, func(s wire.Status) bool { return s.DrainedEpoch == e2 })
	require.Less(t, ack.at.Sub(exited), time.Second, "the ack goes out at once, not with a heartbeat")
	require.Equal(t, int64(0), ack.Inflight)
	require.Equal(t, e2, ack.AppliedEpoch)
	require.Equal(t, e2, a.Stats().DrainedEpoch)
	require.Eventually(t, func() bool { return agentRow(t, b.store, a.ID()).DrainedEpoch == e2 }, 5*time.Second, 10*time.Millisecond)
}

func TestStateMessages(t *testing.T) {
	t.Parallel()

	t.Run("DuplicatesAndReorderingChangeNothing", func(t *testing.T) {
		t.Parallel()
		b := setup(t, fakeOptions{})
		applyRelease(t, b.store, manifestL)
		e := flip(t, b.store, "L", phase.Migrate)
		old, err := b.store.State(context.Background())
		require.NoError(t, err)
		a := startAgent(t, b.config(t, false))
		b.fake.setBeacons(false)
		s0 := a.Snapshot()
		require.Equal(t, e, s0.Epoch())
		ignored := a.Stats().IgnoredStates

		b.fake.publishRaw(forgedState(t, e, phase.Contract), nil)   // same epoch, other content
		b.fake.publishRaw(forgedState(t, e-1, phase.Contract), nil) // older
		b.fake.publishRaw(forgedState(t, 0, phase.Complete), nil)
		barrier(t, a, b.fake)
		require.Same(t, s0, a.Snapshot())
		require.False(t, a.Snapshot().Removed("instances", "name"))
		require.GreaterOrEqual(t, a.Stats().IgnoredStates, ignored+3)

		e2 := flip(t, b.store, "L", phase.Contract)
		b.fake.publishNow()
		waitEpoch(t, a, e2)
		s2 := a.Snapshot()
		require.True(t, s2.Removed("instances", "name"))

		// The old state again, after the new one: nothing changes.
		b.fake.publishState(old)
		b.fake.publishNow()
		barrier(t, a, b.fake)
		require.Same(t, s2, a.Snapshot())
	})

	t.Run("ForgedWithDBChangesNothing", func(t *testing.T) {
		t.Parallel()
		b := setup(t, fakeOptions{noBeacons: true})
		applyRelease(t, b.store, manifestL)
		e := flip(t, b.store, "L", phase.Migrate)
		cfg := b.config(t, true)
		cfg.ConfirmInterval = 50 * time.Millisecond
		a := startAgent(t, cfg)
		s0 := a.Snapshot()

		b.fake.publishRaw(forgedState(t, e+5, phase.Contract), nil)
		require.Eventually(t, func() bool { return rejected(a, RejectUnconfirmed) >= 1 }, 5*time.Second, 5*time.Millisecond)
		require.Same(t, s0, a.Snapshot())
		require.False(t, a.Snapshot().Removed("instances", "name"))

		// A flood of forgeries reads the store at most confirmBurst times
		// at once, then once per interval.
		r0 := a.Stats().Resyncs
		began := time.Now()
		for i := range 300 {
			b.fake.publishRaw(forgedState(t, e+10+int64(i), phase.Contract), nil)
		}
		barrier(t, a, b.fake)
		time.Sleep(2 * cfg.ConfirmInterval)
		reads := a.Stats().Resyncs - r0
		require.LessOrEqual(t, reads, int64(time.Since(began)/cfg.ConfirmInterval)+confirmBurst+1)
		require.Same(t, s0, a.Snapshot())

		// The real flip still goes through.
		e2 := flip(t, b.store, "L", phase.Contract)
		b.fake.publishNow()
		waitEpoch(t, a, e2)
		require.True(t, a.Snapshot().Removed("instances", "name"))
	})

	t.Run("WithDBConfirmedByDigestOrByReading", func(t *testing.T) {
		t.Parallel()
		b := setup(t, fakeOptions{noBeacons: true})
		applyRelease(t, b.store, manifestL)
		a := startAgent(t, b.config(t, true))

		// The broadcaster's message is the store's state: one digest read,
		// and the message itself is applied.
		before := a.Stats()
		e := flip(t, b.store, "L", phase.Migrate)
		b.fake.publishNow()
		waitEpoch(t, a, e)
		after := a.Stats()
		require.Equal(t, before.DigestConfirms+1, after.DigestConfirms)
		require.Equal(t, before.Resyncs, after.Resyncs)

		// A message at the store's epoch that says something else: the
		// digests differ, so the agent reads the state and applies that.
		e2 := flip(t, b.store, "L", phase.Contract)
		b.fake.publishRaw(forgedState(t, e2, phase.Migrate), nil)
		waitEpoch(t, a, e2)
		require.True(t, a.Snapshot().Removed("instances", "name"), "the store's contract, not the message's migrate")
		require.True(t, a.Snapshot().Removed("legacy_flavors", ""), "the store's removals, not the message's")
		final := a.Stats()
		require.Equal(t, after.DigestConfirms, final.DigestConfirms)
		require.Equal(t, after.Resyncs+1, final.Resyncs)
	})

	t.Run("WithDBSignedStatesOfItsStoreNeedNoRead", func(t *testing.T) {
		t.Parallel()
		pub, priv, err := ed25519.GenerateKey(nil)
		require.NoError(t, err)
		b := setup(t, fakeOptions{signer: priv, noBeacons: true})
		applyRelease(t, b.store, manifestL)
		cfg := b.config(t, true)
		cfg.StateKey, cfg.Insecure = pub, false
		a := startAgent(t, cfg)
		cfg.ID, cfg.ConfirmSignedStates = a.ID()+"-confirming", true
		confirming := startAgent(t, cfg)

		// The broadcaster's signed state of this store: applied on the
		// signature, no read; the agent told to confirm reads the digest.
		before, cBefore := a.Stats(), confirming.Stats()
		e := flip(t, b.store, "L", phase.Migrate)
		b.fake.publishNow()
		waitEpoch(t, a, e)
		waitEpoch(t, confirming, e)
		after, cAfter := a.Stats(), confirming.Stats()
		require.Equal(t, before.SignedStates+1, after.SignedStates)
		require.Equal(t, before.DigestConfirms, after.DigestConfirms, "no digest read")
		require.Equal(t, before.Resyncs, after.Resyncs, "no state read")
		require.Equal(t, cBefore.SignedStates, cAfter.SignedStates)
		require.Equal(t, cBefore.DigestConfirms+1, cAfter.DigestConfirms)

		// Signed, but naming another store (or none): the store decides,
		// and it says contract, not the message's migrate.
		e2 := flip(t, b.store, "L", phase.Contract)
		for _, id := range []string{"another-store", ""} {
			var st wire.State
			require.NoError(t, json.Unmarshal(forgedState(t, e2, phase.Migrate), &st))
			st.StoreID = id
			b.fake.publishState(st)
		}
		waitEpoch(t, a, e2)
		require.True(t, a.Snapshot().Removed("instances", "name"), "the store's contract, not the message's migrate")
		final := a.Stats()
		require.Equal(t, after.SignedStates, final.SignedStates)
		require.Equal(t, after.Resyncs+1, final.Resyncs, "confirmed by reading the whole state")
	})

	t.Run("WithDBOnAStoreWithoutDigests", func(t *testing.T) {
		t.Parallel()
		b := setup(t, fakeOptions{noBeacons: true})
		applyRelease(t, b.store, manifestL)
		a := startAgent(t, b.config(t, true))
		// The store as an older binary left it, and a flip made by one.
		q := `"` + b.store.Schema() + `"`
		_, err := b.store.DB().Exec(`ALTER TABLE ` + q + `.epoch DROP COLUMN state_digest;
			UPDATE ` + q + `.epoch SET value = value + 1;
			UPDATE ` + q + `.releases SET phase = 'migrate', phase_epoch = (SELECT value FROM ` + q + `.epoch)`)
		require.NoError(t, err)
		before := a.Stats()
		b.fake.publishNow()
		waitEpoch(t, a, before.AppliedEpoch+1)
		after := a.Stats()
		require.Equal(t, before.DigestConfirms, after.DigestConfirms)
		require.Equal(t, before.Resyncs+1, after.Resyncs, "confirmed by reading the whole state")
	})

	t.Run("SignaturesRequiredWithStateKey", func(t *testing.T) {
		t.Parallel()
		pub, priv, err := ed25519.GenerateKey(nil)
		require.NoError(t, err)
		_, other, err := ed25519.GenerateKey(nil)
		require.NoError(t, err)
		macKey := []byte("status key")
		b := setup(t, fakeOptions{signer: priv, macKey: macKey})
		applyRelease(t, b.store, manifestL)
		e := flip(t, b.store, "L", phase.Migrate)
		cfg := b.config(t, false)
		cfg.StateKey, cfg.StatusMACKey = pub, macKey
		a := startAgent(t, cfg) // signed beacons and grants are accepted
		s0 := a.Snapshot()

		forged := forgedState(t, e+1, phase.Contract)
		sig := func(s string) amqp.Table { return amqp.Table{wire.SignatureHeader: s} }
		b.fake.publishRaw(forged, nil)
		b.fake.publishRaw(forged, sig(wire.Sign(other, forged)))
		b.fake.publishRaw(forged, sig("not base64!"))
		b.fake.publishRaw(forged, sig(wire.Sign(priv, forgedState(t, e+1, phase.Migrate))))
		last := b.fake.lastStatus(t)
		grant, err := wire.EncodeGrant(wire.Grant{AgentID: a.ID(), Incarnation: last.Incarnation, Seq: last.Seq, LeaseMS: 60_000, Epoch: e})
		require.NoError(t, err)
		b.fake.sendGrant(a.ID(), grant, nil)
		require.Eventually(t, func() bool {
			return rejected(a, RejectUnsigned) == 2 && rejected(a, RejectBadSignature) == 3
		}, 5*time.Second, 5*time.Millisecond, "rejected: %v", a.Stats().RejectedMessages)
		require.Same(t, s0, a.Snapshot())
		require.Less(t, a.Stats().LeaseRemaining, 10*time.Second, "the unsigned grant extended nothing")

		b.fake.mu.Lock()
		badMACs := b.fake.badMACs
		b.fake.mu.Unlock()
		require.Zero(t, badMACs)
		require.NotEmpty(t, b.fake.received())

		e2 := flip(t, b.store, "L", phase.Contract)
		b.fake.publishNow()
		waitEpoch(t, a, e2)
	})
}

func TestMalformedMessages(t *testing.T) {
	t.Parallel()
	b := setup(t, fakeOptions{})
	applyRelease(t, b.store, manifestL)
	a := startAgent(t, b.config(t, false))
	s0 := a.Snapshot()
	status, err := wire.EncodeStatus(wire.Status{AgentID: "x", Seq: 1})
	require.NoError(t, err)
	huge := `{"v":1,"kind":"state","epoch":99,"releases":[],"pad":"` + strings.Repeat("x", wire.MaxMessageSize) + `"}`

	for _, tc := range []struct {
		name, body, reason string
	}{
		{"garbage", "{not json", RejectMalformed},
		{"array", "[1,2,3]", RejectMalformed},
		{"trailing data", `{"v":1,"kind":"state","epoch":99}{}`, RejectMalformed},
		{"wrong type", `{"v":1,"kind":"state","epoch":"99"}`, RejectMalformed},
		{"status on the agent queue", string(status), RejectKind},
		{"unknown kind", `{"v":1,"kind":"bogus","epoch":99}`, RejectKind},
		{"null", "null", RejectKind},
		{"future version", `{"v":2,"kind":"state","epoch":99}`, RejectVersion},
		{"negative epoch", `{"v":1,"kind":"state","epoch":-1}`, RejectInvalid},
		{"unknown phase", `{"v":1,"kind":"state","epoch":99,"releases":[{"name":"L","phase":"dropped"}]}`, RejectInvalid},
		{"huge", huge, RejectTooLarge},
		{"grant with no lease", `{"v":1,"kind":"grant","agent_id":"` + a.ID() + `","seq":1,"lease_ms":0,"epoch":1}`, RejectInvalid},
		{"grant for another agent", `{"v":1,"kind":"grant","agent_id":"someone-else","seq":1,"lease_ms":60000,"epoch":1}`, RejectWrongAgent},
		{"grant for another process under the ID", `{"v":1,"kind":"grant","agent_id":"` + a.ID() + `","incarnation":"other","seq":1,"lease_ms":60000,"epoch":1}`, RejectWrongAgent},
		{"grant for a status never sent", `{"v":1,"kind":"grant","agent_id":"` + a.ID() + `","incarnation":"` + a.incarnation + `","seq":1099511627776,"lease_ms":60000,"epoch":1}`, RejectUnknownSeq},
	} {
		before := rejected(a, tc.reason)
		b.fake.publishRaw([]byte(tc.body), nil)
		require.Eventually(t, func() bool { return rejected(a, tc.reason) == before+1 }, 5*time.Second, 5*time.Millisecond,
			"%s: not counted as %s (counts: %v)", tc.name, tc.reason, a.Stats().RejectedMessages)
	}
	require.Same(t, s0, a.Snapshot())
	require.False(t, a.Stats().Fenced)

	// The agent keeps working.
	e := flip(t, b.store, "L", phase.Migrate, phase.Contract)
	b.fake.publishNow()
	waitEpoch(t, a, e)
	g, err := a.Enter()
	require.NoError(t, err)
	require.True(t, g.Snapshot().Removed("legacy_flavors", ""))
	g.Exit()
}

func TestLeaseExpiry(t *testing.T) {
	t.Parallel()

	t.Run("AckSkipsTheGrantOnlyOnAFreshLease", func(t *testing.T) {
		t.Parallel()
		b := setup(t, fakeOptions{lease: 800 * time.Millisecond})
		applyRelease(t, b.store, manifestL)
		a := startAgent(t, b.config(t, false))
		isAck := func(e int64) func(wire.Status) bool {
			return func(s wire.Status) bool { return s.DrainedEpoch == e }
		}

		// Granted every heartbeat: the ack asks for no grant, and the
		// heartbeats alone keep the lease over several lease lengths.
		from := len(b.fake.received())
		e := flip(t, b.store, "L", phase.Migrate)
		b.fake.publishNow()
		ack := b.fake.waitStatus(t, from, 5*time.Second, isAck(e))
		require.True(t, ack.SkipGrant, "an ack on a fresh lease skips its grant")
		hb := b.fake.waitStatus(t, from, 5*time.Second, func(s wire.Status) bool { return s.Seq > ack.Seq })
		require.False(t, hb.SkipGrant, "a heartbeat asks for a grant")
		time.Sleep(3 * 800 * time.Millisecond)
		require.False(t, a.Stats().Fenced)
		require.Zero(t, a.Stats().Fencings)

		// Fenced (no grants at all now): the ack asks for a grant.
		b.fake.answering.Store(false)
		require.Eventually(t, func() bool { return a.Stats().Fenced }, 5*time.Second, 5*time.Millisecond)
		from = len(b.fake.received())
		e = flip(t, b.store, "L", phase.Contract)
		b.fake.publishNow()
		ack = b.fake.waitStatus(t, from, 5*time.Second, isAck(e))
		require.False(t, ack.SkipGrant, "an ack on a spent lease asks for a grant")
		b.fake.answering.Store(true)
		require.Eventually(t, func() bool { return !a.Stats().Fenced }, 5*time.Second, 5*time.Millisecond)
	})

	t.Run("StopSaysGoodbyeOnlyWithNoGuardOpen", func(t *testing.T) {
		t.Parallel()
		b := setup(t, fakeOptions{lease: 10 * time.Second})
		applyRelease(t, b.store, manifestL)

		// A guard still open when Stop's context ends: no goodbye, the
		// lease runs its course, and the log says so.
		var logs testenv.LogBuffer
		cfg := b.config(t, false)
		cfg.Logger = cfg.Logger.Output(io.MultiWriter(zerolog.NewTestWriter(t), &logs))
		busy := startAgent(t, cfg)
		g, err := busy.Enter()
		require.NoError(t, err)
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		err = busy.Stop(ctx)
		cancel()
		require.ErrorIs(t, err, context.DeadlineExceeded)
		require.ErrorContains(t, err, "guards still open: 1")
		require.Contains(t, logs.String(), "the context ended with guards open; no goodbye, the lease runs out on its own")
		g.Exit()
		for _, st := range b.fake.received() {
			require.False(t, st.Leaving && st.AgentID == busy.ID(), "no goodbye with a guard open")
		}
		row := agentRow(t, b.store, busy.ID())
		require.True(t, row.Live(), "its lease still runs")

		// No guard open: the goodbye ends the lease in the store at once,
		// over the broker, or straight into the store without one.
		for _, withDB := range []bool{false, true} {
			cfg := b.config(t, withDB)
			if withDB {
				cfg.AMQPURL = "amqp://guest:guest@127.0.0.1:1/" // no broker: the store path
			}
			a := startAgent(t, cfg)
			row := agentRow(t, b.store, a.ID())
			require.True(t, row.Live())
			g, err := a.Enter()
			require.NoError(t, err)
			g.Exit()
			stopAgent(t, a)
			require.Eventually(t, func() bool { row := agentRow(t, b.store, a.ID()); return !row.Live() }, 5*time.Second, 5*time.Millisecond,
				"the goodbye ended the lease (db=%v)", withDB)
			_, err = a.Enter()
			require.Error(t, err, "no guard after Stop")
		}
	})

	t.Run("WithoutDB", func(t *testing.T) {
		t.Parallel()
		b := setup(t, fakeOptions{lease: 800 * time.Millisecond})
		applyRelease(t, b.store, manifestL)
		a := startAgent(t, b.config(t, false))
		g, err := a.Enter()
		require.NoError(t, err)
		g.Exit()

		b.fake.answering.Store(false)
		require.Eventually(t, func() bool { return a.Stats().Fenced }, 5*time.Second, 5*time.Millisecond)
		_, err = a.Enter()
		require.ErrorIs(t, err, ErrStale)
		st := a.Stats()
		require.Equal(t, int64(1), st.StaleRefusals)
		require.GreaterOrEqual(t, st.Fencings, int64(1))
		require.Negative(t, st.LeaseRemaining)

		b.fake.answering.Store(true)
		require.Eventually(t, func() bool { return !a.Stats().Fenced }, 5*time.Second, 5*time.Millisecond)
		g, err = a.Enter()
		require.NoError(t, err)
		g.Exit()
	})

	t.Run("WithDBBlackHoledEnterRefusesInBoundedTime", func(t *testing.T) {
		t.Parallel()
		b := setup(t, fakeOptions{lease: 600 * time.Millisecond, noBeacons: true})
		applyRelease(t, b.store, manifestL)
		pgHost, err := faultproxy.HostPort(testenv.DatabaseURL())
		require.NoError(t, err)
		proxy := faultproxy.Start(t, pgHost)
		db, err := sql.Open("postgres", proxy.URL(testenv.DatabaseURL()))
		require.NoError(t, err)
		t.Cleanup(func() { db.Close() })
		cfg := b.config(t, true)
		cfg.DB = db
		cfg.InitialLease = 600 * time.Millisecond
		a := startAgent(t, cfg)

		// The store link swallows traffic, and no grant comes: fenced, the
		// re-sync hangs where lib/pq cannot abandon it.
		proxy.Blackhole(true)
		b.fake.answering.Store(false)
		require.Eventually(t, func() bool { return a.Stats().Fenced }, 5*time.Second, 5*time.Millisecond)
		began := time.Now()
		_, err = a.Enter()
		waited := time.Since(began)
		require.ErrorIs(t, err, ErrStale)
		require.Less(t, waited, syncTimeout+time.Second, "Enter refused within the re-sync's bound")
		began = time.Now()
		_, err = a.Enter()
		require.ErrorIs(t, err, ErrStale)
		require.Less(t, time.Since(began), 100*time.Millisecond, "later callers do not wait for a re-sync past its bound")
		t.Logf("first fenced Enter refused after %s", waited.Round(time.Millisecond))

		// The link heals: the re-sync finishes and work resumes.
		proxy.Blackhole(false)
		b.fake.answering.Store(true)
		require.Eventually(t, func() bool {
			g, err := a.Enter()
			if err != nil {
				return false
			}
			g.Exit()
			return true
		}, 10*time.Second, 10*time.Millisecond)
	})

	t.Run("WithDBEnterResyncs", func(t *testing.T) {
		t.Parallel()
		// No beacons: only Enter may bring the flip below.
		b, a, e := startFencedWithDB(t)
		before := agentRow(t, b.store, a.ID())
		r0 := a.Stats().Resyncs

		// A flip while fenced: the re-sync brings it in.
		e2 := flip(t, b.store, "L", phase.Migrate, phase.Contract)
		require.Greater(t, e2, e)
		g, err := a.Enter()
		require.NoError(t, err)
		require.Equal(t, e2, g.Snapshot().Epoch())
		g.Exit()
		st := a.Stats()
		require.Equal(t, r0+1, st.Resyncs)
		require.False(t, st.Fenced)
		require.Zero(t, st.StaleRefusals)
		after := agentRow(t, b.store, a.ID())
		require.True(t, after.LeaseExpiresAt.After(before.LeaseExpiresAt), "the store lease was extended")
		require.True(t, after.Live())
		require.Greater(t, after.Seq, before.Seq)

		// Many requests meeting the fence at once: one store read.
		require.Eventually(t, func() bool { return a.Stats().Fenced }, 5*time.Second, 5*time.Millisecond)
		r1 := a.Stats().Resyncs
		var wg sync.WaitGroup
		start := make(chan struct{})
		errs := make(chan error, 16)
		for range 16 {
			wg.Go(func() {
				<-start
				g, err := a.Enter()
				if err == nil {
					g.Exit()
				}
				errs <- err
			})
		}
		close(start)
		wg.Wait()
		close(errs)
		for err := range errs {
			require.NoError(t, err)
		}
		require.Equal(t, r1+1, a.Stats().Resyncs)
	})

	t.Run("GrantAheadWithoutDB", func(t *testing.T) {
		t.Parallel()
		b := setup(t, fakeOptions{lease: 800 * time.Millisecond})
		applyRelease(t, b.store, manifestL)
		e1 := flip(t, b.store, "L", phase.Migrate)
		a := startAgent(t, b.config(t, false))
		b.fake.setBeacons(false)

		// A flip whose state never arrives: the grants still do, and say
		// the agent is behind, so they must not extend its lease.
		e2 := flip(t, b.store, "L", phase.Contract)
		require.Eventually(t, func() bool { return a.Stats().BehindGrants >= 2 }, 5*time.Second, 5*time.Millisecond)
		require.Eventually(t, func() bool { return a.Stats().Fenced }, 5*time.Second, 5*time.Millisecond)
		require.Equal(t, e1, a.Stats().AppliedEpoch)
		_, err := a.Enter()
		require.ErrorIs(t, err, ErrStale)

		b.fake.setBeacons(true)
		waitEpoch(t, a, e2)
		require.Eventually(t, func() bool { return !a.Stats().Fenced }, 5*time.Second, 5*time.Millisecond)
	})

	t.Run("GrantAheadWithDB", func(t *testing.T) {
		t.Parallel()
		b := setup(t, fakeOptions{noBeacons: true})
		applyRelease(t, b.store, manifestL)
		e1 := flip(t, b.store, "L", phase.Migrate)
		a := startAgent(t, b.config(t, true))
		require.Equal(t, e1, a.Snapshot().Epoch())
		r0 := a.Stats().Resyncs

		e2 := flip(t, b.store, "L", phase.Contract)
		waitEpoch(t, a, e2) // no state message: the grant's epoch made it re-sync
		st := a.Stats()
		require.GreaterOrEqual(t, st.BehindGrants, int64(1))
		require.Greater(t, st.Resyncs, r0)
		require.Empty(t, st.RejectedMessages)
	})
}

func TestReconnect(t *testing.T) {
	t.Parallel()
	for _, withDB := range []bool{false, true} {
		name := map[bool]string{false: "WithoutDB", true: "WithDB"}[withDB]
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			b := setup(t, fakeOptions{})
			applyRelease(t, b.store, manifestL)
			a := startAgent(t, b.config(t, withDB))
			queue := a.session().queue
			r0 := a.Stats().Resyncs

			// Make the broker close the agent's publishing channel: a
			// publish to an exchange that does not exist.
			sess := a.session()
			require.NotNil(t, sess)
			_ = sess.pub.Publish("no-such-exchange-"+b.prefix, "", false, false, amqp.Publishing{Body: []byte("x")})

			require.Eventually(t, func() bool { return a.Stats().Reconnects >= 1 }, 10*time.Second, 10*time.Millisecond)
			b.fake.waitStatus(t, 0, 10*time.Second, func(wire.Status) bool { s := a.session(); return s != nil && s.queue != queue })
			if withDB {
				// The new session re-syncs before its first status.
				require.Eventually(t, func() bool { return a.Stats().Resyncs > r0 }, 10*time.Second, 10*time.Millisecond,
					"a reconnect re-syncs from the store")
			}
			e := flip(t, b.store, "L", phase.Migrate)
			b.fake.publishNow()
			waitEpoch(t, a, e)
			require.False(t, a.Stats().Fenced)
		})
	}
}

// TestStopJoinsGoroutines is not parallel: it counts goroutines. Parallel
// tests are parked in t.Parallel while it runs.
func TestStopJoinsGoroutines(t *testing.T) {
	b := setup(t, fakeOptions{})
	applyRelease(t, b.store, manifestL)
	idle := testenv.Prefix(t) // no broadcaster listens here
	time.Sleep(100 * time.Millisecond)
	base := runtime.NumGoroutine()

	a, err := New(b.config(t, true))
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	require.NoError(t, a.Stop(ctx), "Stop before Start")
	for range 2 {
		require.NoError(t, a.Start(ctx))
		require.NoError(t, a.Start(ctx), "Start twice")
		g, err := a.Enter()
		require.NoError(t, err)
		g.Exit()
		require.NoError(t, a.Stop(ctx))
		require.NoError(t, a.Stop(ctx), "Stop twice")
		_, err = a.Enter()
		require.ErrorIs(t, err, ErrStale)
	}
	requireGoroutines(t, base)

	// A Start that times out leaves nothing behind either.
	cfg := b.config(t, false)
	cfg.ExchangePrefix = idle
	a2, err := New(cfg)
	require.NoError(t, err)
	short, cancelShort := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancelShort()
	require.ErrorIs(t, a2.Start(short), context.DeadlineExceeded)
	requireGoroutines(t, base)
}

func requireGoroutines(t *testing.T, base int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for runtime.NumGoroutine() > base && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > base {
		buf := make([]byte, 1<<20)
		buf = buf[:runtime.Stack(buf, true)]
		require.FailNow(t, "goroutines left behind", "%d goroutines, baseline %d:\n%s", n, base, buf)
	}
}
