package broadcaster_test

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"fmt"
	"strings"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/broadcaster"
	"github.com/phasecast/phasecast/internal/amqpx"
	"github.com/phasecast/phasecast/internal/wire"
)

func TestStatus(t *testing.T) {
	t.Parallel()
	ctx := context.Background()

	t.Run("RecordsAndGrants", func(t *testing.T) {
		t.Parallel()
		bundle := setup(t)
		epoch := applyRelease(t, bundle.store, "L")
		pub, priv, err := ed25519.GenerateKey(rand.Reader)
		require.NoError(t, err)
		macKey := []byte("status secret")
		cfg := bundle.config(t)
		cfg.SigningKey, cfg.StatusMACKey = priv, macKey
		b := start(t, cfg)
		_, grants := bundle.replyQueue(t)

		st := status("agent-1", 1)
		st.AppliedEpoch, st.DrainedEpoch = epoch, epoch
		bundle.sendStatus(t, st, macKey)
		g := waitGrant(t, grants, pub, 10*time.Second)
		require.Equal(t, wire.Grant{V: wire.Version, Kind: wire.KindGrant, AgentID: "agent-1", Incarnation: st.Incarnation, Seq: 1, LeaseMS: 10_000, Epoch: epoch}, g)

		agents, err := bundle.store.Agents(ctx)
		require.NoError(t, err)
		require.Len(t, agents, 1)
		a := agents[0]
		require.Equal(t, "agent-1", a.ID)
		require.Equal(t, "nova-api", a.Service)
		require.Equal(t, int64(1), a.Seq)
		require.Equal(t, epoch, a.DrainedEpoch)
		require.True(t, a.Live())
		// The lease is LeaseDuration from the write, on the database clock.
		var leaseMS int64
		require.NoError(t, bundle.store.DB().Get(&leaseMS,
			`SELECT (extract(epoch FROM lease_expires_at - last_seen) * 1000)::bigint FROM `+quoted(bundle)+`.agents WHERE id = 'agent-1'`))
		require.Equal(t, int64(10_000), leaseMS)

		// A replay is acked, counted, not recorded and not granted.
		bundle.sendStatus(t, st, macKey)
		require.Eventually(t, func() bool { return b.Stats().Rejected[broadcaster.RejectStaleSeq] == 1 }, 5*time.Second, 10*time.Millisecond)
		requireNoDelivery(t, grants, 300*time.Millisecond)
		again, err := bundle.store.Agents(ctx)
		require.NoError(t, err)
		require.Equal(t, a.LastSeen, again[0].LastSeen, "a replayed seq does not touch the row")

		// The next seq is recorded and granted.
		st.Seq = 2
		bundle.sendStatus(t, st, macKey)
		require.Equal(t, uint64(2), waitGrant(t, grants, pub, 10*time.Second).Seq)
		stats := b.Stats()
		require.Equal(t, int64(2), stats.StatusesRecorded)
		require.Equal(t, int64(2), stats.GrantsSent)
	})

	t.Run("NewestInBatchAnswersForOlder", func(t *testing.T) {
		t.Parallel()
		bundle := setup(t)
		cfg := bundle.config(t)
		cfg.StatusBatchWait = 300 * time.Millisecond // one batch for both
		b := start(t, cfg)
		_, grants := bundle.replyQueue(t)
		bundle.sendStatus(t, status("agent-1", 5), nil)
		bundle.sendStatus(t, status("agent-1", 6), nil)
		require.Equal(t, uint64(6), waitGrant(t, grants, nil, 10*time.Second).Seq)
		requireNoDelivery(t, grants, 300*time.Millisecond)
		stats := b.Stats()
		require.Equal(t, int64(1), stats.StatusesRecorded)
		require.Equal(t, int64(1), stats.StatusBatches)
		require.Zero(t, stats.Rejected[broadcaster.RejectStaleSeq])
	})

	t.Run("AcksOnAFreshLeaseAreNotGranted", func(t *testing.T) {
		t.Parallel()
		bundle := setup(t)
		epoch := applyRelease(t, bundle.store, "L")
		cfg := bundle.config(t)
		// Wide batches, so the heartbeat and the ack below share one.
		cfg.StatusBatchWait, cfg.StatusBatchGap = 2*time.Second, time.Second
		b := start(t, cfg)
		_, grants := bundle.replyQueue(t)

		// Current and asking for no grant: recorded, lease renewed in the
		// store, no grant.
		st := status("agent-acked", 1)
		st.AppliedEpoch, st.DrainedEpoch, st.SkipGrant = epoch, epoch, true
		bundle.sendStatus(t, st, nil)
		require.Eventually(t, func() bool { return b.Stats().StatusesRecorded == 1 }, 10*time.Second, 10*time.Millisecond)
		requireNoDelivery(t, grants, 300*time.Millisecond)
		agents, err := bundle.store.Agents(ctx)
		require.NoError(t, err)
		require.Len(t, agents, 1)
		require.Equal(t, epoch, agents[0].DrainedEpoch)
		require.True(t, agents[0].Live())

		// Behind the epoch: granted anyway, so the agent learns it.
		behind := status("agent-behind", 1)
		behind.SkipGrant = true
		bundle.sendStatus(t, behind, nil)
		g := waitGrant(t, grants, nil, 10*time.Second)
		require.Equal(t, "agent-behind", g.AgentID)
		require.Equal(t, epoch, g.Epoch)

		// A heartbeat then an ack in one batch: the newest seq is granted,
		// because the heartbeat asked.
		hb := status("agent-acked", 2)
		hb.AppliedEpoch, hb.DrainedEpoch = epoch, epoch
		ack := hb
		ack.Seq, ack.SkipGrant = 3, true
		bundle.sendStatus(t, hb, nil)
		bundle.sendStatus(t, ack, nil)
		g = waitGrant(t, grants, nil, 10*time.Second)
		require.Equal(t, "agent-acked", g.AgentID)
		require.Equal(t, uint64(3), g.Seq)
		require.Equal(t, int64(2), b.Stats().GrantsSent)
	})

	t.Run("Batches", func(t *testing.T) {
		t.Parallel()
		bundle := setup(t)
		b := start(t, bundle.config(t))
		_, grants := bundle.replyQueue(t)
		// Wait for the consumer, so the statuses meet a running batcher
		// rather than a queue that filled up before it started.
		bundle.sendStatus(t, status("agent-warmup", 1), nil)
		waitGrant(t, grants, nil, 10*time.Second)
		batchesBefore := b.Stats().StatusBatches

		// Build (and bind the grant queue for) every status first, then
		// publish them back to back: the batcher must meet a burst, not
		// a sender paced by its own round trips.
		const n = 300
		msgs := make([]amqp.Publishing, n)
		for i := range n {
			body, headers := bundle.statusBody(t, status(fmt.Sprintf("agent-%03d", i), 1), nil)
			msgs[i] = bundle.publishing(t, body, headers)
		}
		for _, msg := range msgs {
			require.NoError(t, bundle.ch.PublishWithContext(ctx, "", amqpx.StatusQueue(bundle.prefix), false, false, msg))
		}
		for range n {
			waitGrant(t, grants, nil, 10*time.Second)
		}
		stats := b.Stats()
		require.Equal(t, int64(n+1), stats.StatusesRecorded)
		batches := stats.StatusBatches - batchesBefore
		t.Logf("%d statuses recorded in %d transactions", n, batches)
		require.LessOrEqual(t, batches, int64(n/10), "statuses are recorded in batches, not one transaction each")
		live, err := bundle.store.LiveAgents(ctx)
		require.NoError(t, err)
		require.Len(t, live, n+1)
	})

	t.Run("RejectsBadMessages", func(t *testing.T) {
		t.Parallel()
		bundle := setup(t)
		epochBefore := applyRelease(t, bundle.store, "L")
		macKey := []byte("status secret")
		cfg := bundle.config(t)
		cfg.StatusMACKey = macKey
		b := start(t, cfg)
		_, grants := bundle.replyQueue(t)

		encode := func(st wire.Status) []byte {
			st.StoreID = bundle.storeID(t)
			body, err := wire.EncodeStatus(st)
			require.NoError(t, err)
			return body
		}
		signed := func(body []byte) amqp.Table { return amqp.Table{wire.MACHeader: wire.MAC(macKey, body)} }
		good := encode(status("agent-bad", 1))
		withPID := status("agent-bad", 1)
		withPID.PID = 1 << 40
		withNUL := status("agent-bad", 1)
		withNUL.Service = "nova\x00api"
		huge := status("agent-bad", 1)
		huge.Version = strings.Repeat("x", wire.MaxMessageSize)
		cases := []struct {
			name    string
			body    []byte
			headers amqp.Table
			reason  string
		}{
			{"not JSON", []byte("{not json"), nil, broadcaster.RejectMalformed},
			{"wrong type", []byte(`{"v":2,"kind":"status","agent_id":"a","seq":"one"}`), nil, broadcaster.RejectMalformed},
			{"no agent id", []byte(`{"v":2,"kind":"status","seq":1}`), nil, broadcaster.RejectMalformed},
			{"pid out of range", encode(withPID), nil, broadcaster.RejectMalformed},
			{"NUL byte", encode(withNUL), nil, broadcaster.RejectMalformed},
			{"newer version", []byte(`{"v":3,"kind":"status","agent_id":"a"}`), nil, broadcaster.RejectVersion},
			{"a status of v1, without a token", []byte(`{"v":1,"kind":"status","agent_id":"old-1","service":"nova","host":"h1"}`), nil, broadcaster.RejectVersion},
			{"a state", []byte(`{"v":1,"kind":"state","epoch":99,"releases":[]}`), nil, broadcaster.RejectKind},
			{"too large", encode(huge), nil, broadcaster.RejectTooLarge},
			{"no MAC", good, amqp.Table{}, broadcaster.RejectUnsigned},
			{"wrong MAC", good, amqp.Table{wire.MACHeader: wire.MAC([]byte("other key"), good)}, broadcaster.RejectBadSignature},
			{"MAC of another body", good, amqp.Table{wire.MACHeader: wire.MAC(macKey, []byte("x"))}, broadcaster.RejectBadSignature},
			{"MAC not a string", good, amqp.Table{wire.MACHeader: int32(7)}, broadcaster.RejectBadSignature},
		}
		want := map[string]int64{}
		for _, tc := range cases {
			headers := tc.headers
			if headers == nil {
				headers = signed(tc.body)
			}
			bundle.sendRaw(t, tc.body, headers)
			want[tc.reason]++
		}
		// A good status after the bad ones: once it is granted, every bad
		// one before it has been dealt with.
		fence := encode(status("agent-good", 1))
		bundle.sendRaw(t, fence, signed(fence))
		g := waitGrant(t, grants, nil, 10*time.Second)
		require.Equal(t, "agent-good", g.AgentID)
		requireNoDelivery(t, grants, 200*time.Millisecond)

		stats := b.Stats()
		for _, reason := range []string{broadcaster.RejectMalformed, broadcaster.RejectVersion, broadcaster.RejectKind,
			broadcaster.RejectTooLarge, broadcaster.RejectUnsigned, broadcaster.RejectBadSignature} {
			require.Equal(t, want[reason], stats.Rejected[reason], reason)
		}
		require.Zero(t, stats.Rejected[broadcaster.RejectStaleSeq])
		require.Equal(t, int64(1), stats.StatusesRecorded)
		agents, err := bundle.store.Agents(ctx)
		require.NoError(t, err)
		require.Len(t, agents, 1)
		require.Equal(t, "agent-good", agents[0].ID)
		epoch, err := bundle.store.Epoch(ctx)
		require.NoError(t, err)
		require.Equal(t, epochBefore, epoch, "a bad status changes nothing")
		require.True(t, b.IsLeader())

		q, err := bundle.ch.QueueDeclarePassive(amqpx.StatusQueue(bundle.prefix), true, false, false, false, nil)
		require.NoError(t, err)
		require.Zero(t, q.Messages, "bad statuses are dropped, not requeued")
	})

	t.Run("IsolatesStatusTheDatabaseRefuses", func(t *testing.T) {
		t.Parallel()
		bundle := setup(t)
		// A refusal the decoder cannot foresee, standing for any data error.
		_, err := bundle.store.DB().Exec(`ALTER TABLE ` + quoted(bundle) + `.agents ADD CONSTRAINT no_poison CHECK (service <> 'poison')`)
		require.NoError(t, err)
		cfg := bundle.config(t)
		cfg.StatusBatchWait = 300 * time.Millisecond // one batch for all three
		b := start(t, cfg)
		_, grants := bundle.replyQueue(t)
		poison := status("agent-poison", 1)
		poison.Service = "poison"
		bundle.sendStatus(t, status("agent-a", 1), nil)
		bundle.sendStatus(t, poison, nil)
		bundle.sendStatus(t, status("agent-b", 1), nil)
		got := map[string]bool{}
		for range 2 {
			got[waitGrant(t, grants, nil, 10*time.Second).AgentID] = true
		}
		require.Equal(t, map[string]bool{"agent-a": true, "agent-b": true}, got)
		requireNoDelivery(t, grants, 300*time.Millisecond)
		require.Equal(t, int64(1), b.Stats().Rejected[broadcaster.RejectMalformed])
	})

	t.Run("DeclaresTheStatusQueueAgainWhenItIsGone", func(t *testing.T) {
		t.Parallel()
		bundle := setup(t)
		b := start(t, bundle.config(t))
		_, grants := bundle.replyQueue(t)
		bundle.sendStatus(t, status("agent-before", 1), nil)
		waitGrant(t, grants, nil, 10*time.Second)

		// As RabbitMQ deletes a non-durable classic queue whose node is
		// lost: the consumer is cancelled, and the broadcaster's next
		// session declares the queue again.
		deleteStatusQueue(t, bundle)
		deleted := time.Now()
		require.Eventually(t, func() bool {
			ch, err := bundle.conn.Channel()
			if err != nil {
				return false
			}
			defer ch.Close()
			_, err = ch.QueueDeclarePassive(amqpx.StatusQueue(bundle.prefix), false, false, false, false, nil)
			return err == nil
		}, 10*time.Second, 20*time.Millisecond, "the broadcaster declares the status queue again")
		t.Logf("status queue declared again %s after it was deleted", time.Since(deleted).Round(time.Millisecond))
		require.Eventually(t, func() bool { return b.Stats().StatusesRecorded == 1 && b.IsLeader() }, 10*time.Second, 20*time.Millisecond)
		bundle.sendStatus(t, status("agent-after", 1), nil)
		require.Equal(t, "agent-after", waitGrant(t, grants, nil, 10*time.Second).AgentID)
		require.Equal(t, int64(2), b.Stats().StatusesRecorded)
	})

	t.Run("UsesAStatusQueueDeclaredOtherwise", func(t *testing.T) {
		t.Parallel()
		bundle := setup(t)
		// A quorum queue, as an earlier release declared it, where the
		// broadcaster's default is a classic one: used as it is.
		deleteStatusQueue(t, bundle)
		kept, err := amqpx.DeclareStatusQueueAs(bundle.conn, bundle.prefix, amqpx.StatusQueueQuorum)
		require.NoError(t, err)
		require.False(t, kept)
		kept, err = amqpx.DeclareStatusQueueAs(bundle.conn, bundle.prefix, amqpx.StatusQueueClassic)
		require.NoError(t, err)
		require.True(t, kept, "a queue declared otherwise is kept")

		b := start(t, bundle.config(t))
		_, grants := bundle.replyQueue(t)
		bundle.sendStatus(t, status("agent-on-quorum", 1), nil)
		require.Equal(t, "agent-on-quorum", waitGrant(t, grants, nil, 10*time.Second).AgentID)
		require.Equal(t, int64(1), b.Stats().StatusesRecorded)
	})

	t.Run("RetriesWhenTheDatabaseFails", func(t *testing.T) {
		t.Parallel()
		bundle := setup(t)
		b := start(t, bundle.config(t))
		_, grants := bundle.replyQueue(t)
		bundle.sendStatus(t, status("agent-warmup", 1), nil)
		waitGrant(t, grants, nil, 10*time.Second)

		// Writes fail while the table is away; the status must survive in
		// the queue and be recorded once it is back.
		_, err := bundle.store.DB().Exec(`ALTER TABLE ` + quoted(bundle) + `.agents RENAME TO agents_away`)
		require.NoError(t, err)
		bundle.sendStatus(t, status("agent-patient", 1), nil)
		time.Sleep(700 * time.Millisecond)
		require.Equal(t, int64(1), b.Stats().StatusesRecorded)
		_, err = bundle.store.DB().Exec(`ALTER TABLE ` + quoted(bundle) + `.agents_away RENAME TO agents`)
		require.NoError(t, err)

		g := waitGrant(t, grants, nil, 10*time.Second)
		require.Equal(t, "agent-patient", g.AgentID)
		require.Equal(t, int64(2), b.Stats().StatusesRecorded)
		require.Zero(t, b.Stats().Rejected[broadcaster.RejectMalformed])
	})
}

// deleteStatusQueue deletes the bundle's status queue, as an operator or
// the loss of its node would.
func deleteStatusQueue(t *testing.T, bundle *testBundle) {
	t.Helper()
	ch, err := bundle.conn.Channel()
	require.NoError(t, err)
	_, err = ch.QueueDelete(amqpx.StatusQueue(bundle.prefix), false, false, false)
	require.NoError(t, err)
	require.NoError(t, ch.Close())
}
