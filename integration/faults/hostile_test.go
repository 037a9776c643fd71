package faults

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"math"
	"strings"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/agent"
	"github.com/phasecast/phasecast/broadcaster"
	"github.com/phasecast/phasecast/internal/amqpx"
	"github.com/phasecast/phasecast/internal/keys"
	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/internal/wire"
	"github.com/phasecast/phasecast/schema"
)

// attacker publishes whatever it likes as the broker's guest user, without
// a user_id: what any client with write access to the state exchange and
// amq.default can do, with no principal to vouch for it.
type attacker struct {
	t  *testing.T
	ch *amqp.Channel
	e  *env
}

func (e *env) attacker() *attacker {
	e.t.Helper()
	conn := testenv.AMQP(e.t)
	ch, err := conn.Channel()
	require.NoError(e.t, err)
	require.NoError(e.t, ch.Confirm(false))
	return &attacker{t: e.t, ch: ch, e: e}
}

// publish sends body to exchange/key and waits for the broker's confirm.
func (x *attacker) publish(exchange, key string, body []byte, headers amqp.Table) {
	x.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	dc, err := x.ch.PublishWithDeferredConfirmWithContext(ctx, exchange, key, false, false, amqp.Publishing{Body: body, Headers: headers})
	require.NoError(x.t, err)
	ok, err := dc.WaitContext(ctx)
	require.NoError(x.t, err)
	require.True(x.t, ok)
}

// flood sends n copies of body without waiting for each confirm, then
// waits for all of them.
func (x *attacker) flood(exchange, key string, body []byte, n int) {
	x.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*wait)
	defer cancel()
	var last *amqp.DeferredConfirmation
	for range n {
		dc, err := x.ch.PublishWithDeferredConfirmWithContext(ctx, exchange, key, false, false, amqp.Publishing{Body: body})
		require.NoError(x.t, err)
		last = dc
	}
	// Confirms are cumulative in order: the last one confirms them all.
	ok, err := last.WaitContext(ctx)
	require.NoError(x.t, err)
	require.True(x.t, ok)
}

func (x *attacker) toAgents(body []byte, headers amqp.Table) {
	x.publish(amqpx.StateExchange(x.e.prefix), "", body, headers)
}

func (x *attacker) toBroadcaster(body []byte, headers amqp.Table) {
	x.publish("", amqpx.StatusQueue(x.e.prefix), body, headers)
}

// forgedState is a state the broadcaster never sent: L rolled back to
// migrate at a far higher epoch, which would bring the removed columns
// back into every snapshot.
func forgedState(t *testing.T, epoch int64, p phase.Phase, table string) []byte {
	body, err := wire.EncodeState(wire.State{Epoch: epoch, SentAt: time.Now(), Releases: []wire.Release{{
		Name: "L", Phase: p, Removals: []wire.Removal{{Table: table, Columns: []string{"name", "display_name"}}},
	}}})
	require.NoError(t, err)
	return body
}

// statusBody is a forged status, of the test's store and sent now unless
// st says otherwise. The store id is no secret (every state message
// carries it): it tells stores and runs apart, it does not authenticate.
func (e *env) statusBody(st wire.Status) []byte {
	e.t.Helper()
	if st.StoreID == "" {
		id, err := e.store.ID(e.ctx)
		require.NoError(e.t, err)
		st.StoreID = id
	}
	if st.SentAt.IsZero() {
		st.SentAt = time.Now()
	}
	st.Service, st.Host, st.Releases = "forger", "nowhere", []string{"L"}
	// A forger can make up an incarnation and a token; what it cannot
	// have is the token of another agent's row.
	if st.Incarnation == "" {
		st.Incarnation = "forger"
	}
	if st.Token == "" {
		st.Token = strings.Repeat("f0", wire.TokenSize)
	}
	body, err := wire.EncodeStatus(st)
	require.NoError(e.t, err)
	return body
}

// jsonLogger logs to sink at warn and above, in JSON so tests can search it.
func jsonLogger(sink *testenv.LogBuffer) zerolog.Logger {
	return zerolog.New(sink).Level(zerolog.WarnLevel).With().Timestamp().Logger()
}

// registered reports whether the store has a row for agent id.
func (e *env) registered(id string) bool {
	e.t.Helper()
	agents, err := e.store.Agents(e.ctx)
	require.NoError(e.t, err)
	for _, a := range agents {
		if a.ID == id {
			return true
		}
	}
	return false
}

// TestForgedStatesWithoutKeys: no keys anywhere, agents with a store
// connection. A forged state published straight to the state exchange,
// claiming a far higher epoch, changes nothing: the agent reads the store,
// which does not confirm it. A flood of 10,000 costs the database at most
// one read per ConfirmInterval plus a burst, and does not delay a real
// flip.
func TestForgedStatesWithoutKeys(t *testing.T) {
	t.Parallel()
	const floodSize = 10_000
	e := setup(t)
	e.startBroadcaster(nil)
	sink := &testenv.LogBuffer{}
	cfg := e.agentConfig("target-0", e.agentDB(2))
	cfg.Logger = jsonLogger(sink)
	a := e.startAgent(cfg)
	tr := e.runTraffic(a, e.serviceDB("faults-forged", 4), 2)
	migrate := e.flip(phase.Migrate)
	e.waitDrained(migrate, a.ID())
	snap := a.Snapshot()
	x := e.attacker()

	// One forged state: confirmed against the store, found false, dropped.
	x.toAgents(forgedState(t, migrate+1000, phase.Complete, e.table), nil)
	waitFor(t, wait, "the forged state to be rejected", func() bool { return a.Stats().RejectedMessages[agent.RejectUnconfirmed] >= 1 })
	require.Same(t, snap, a.Snapshot(), "a forged state changed the snapshot")
	require.Positive(t, sink.Count(`"reason":"unconfirmed"`, "message rejected"))

	// A flood. Store reads are what it may cost: at most one per
	// ConfirmInterval after a burst of 4.
	before := a.Stats()
	start := time.Now()
	for i := range floodSize / 1000 {
		for j := range 1000 {
			require.NoError(t, x.ch.PublishWithContext(e.ctx, amqpx.StateExchange(e.prefix), "", false, false,
				amqp.Publishing{Body: forgedState(t, migrate+int64(2000+i*1000+j), phase.Complete, e.table)}))
		}
	}
	// A sentinel the agent counts: once it is rejected, every forged
	// state before it has been handled.
	malformed := before.RejectedMessages[agent.RejectMalformed]
	x.toAgents([]byte("sentinel"), nil)
	waitFor(t, wait, "the agent to work through the flood", func() bool {
		return a.Stats().RejectedMessages[agent.RejectMalformed] > malformed
	})
	time.Sleep(3 * confirmIvl) // a read the last message asked for
	elapsed := time.Since(start)
	after := a.Stats()
	reads := (after.Resyncs + after.ResyncFailures) - (before.Resyncs + before.ResyncFailures)
	bound := int64(elapsed/confirmIvl) + 4 + 1
	require.LessOrEqual(t, reads, bound, "%d store reads for %d forged states in %s", reads, floodSize, elapsed)
	require.Same(t, snap, a.Snapshot(), "the flood changed the snapshot")

	// A real flip still gets through at once.
	contract := e.flip(phase.Contract)
	acked := e.waitDrained(contract, a.ID())
	require.True(t, a.Snapshot().Removed(e.table, "name"))
	queries, failed, _, failures := totals(tr)
	require.Zero(t, failed, "queries failed: %v", failures)
	require.Positive(t, queries)
	figure(t, "forged_states", floodSize+1)
	figure(t, "flood_handled_in", elapsed)
	figure(t, "store_reads", reads)
	figure(t, "store_reads_bound", bound)
	figure(t, "rejected_unconfirmed", after.RejectedMessages[agent.RejectUnconfirmed])
	figure(t, "state_changes", 0)
	figure(t, "real_flip_acked_after_flood", acked)
	figure(t, "queries_failed", failed)
}

// TestSignedMessages: a broadcaster with a signing key and a status MAC
// key, agents with the public key and the MAC key, end to end. Unsigned,
// badly signed and replayed states, and an unsigned grant, are rejected,
// logged and counted, and change nothing. A forged acknowledgement (a
// status for an existing agent claiming to have drained the contract
// epoch) without a valid MAC is rejected, and the runner keeps waiting for
// the real one. Without a MAC key the same forgery is believed: the limit
// docs/RELIABILITY.md spells out.
func TestSignedMessages(t *testing.T) {
	t.Parallel()
	e := setup(t)
	k, err := keys.Generate()
	require.NoError(t, err)
	_, otherKey, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	bsink, asink := &testenv.LogBuffer{}, &testenv.LogBuffer{}
	b := e.startBroadcaster(func(c *broadcaster.Config) {
		c.SigningKey, c.StatusMACKey, c.Logger = k.StatePrivate, k.StatusMAC, jsonLogger(bsink)
	})
	var agents []*agent.Agent
	for i, db := range []bool{true, false} {
		cfg := e.agentConfig(fmt.Sprintf("signed-%d", i), nil)
		if db {
			cfg.DB = e.agentDB(2)
		}
		cfg.StateKey, cfg.StatusMACKey, cfg.Logger = k.StatePublic, k.StatusMAC, jsonLogger(asink)
		agents = append(agents, e.startAgent(cfg))
	}
	holder := agents[0]

	// Capture a genuine signed state, to replay it later.
	x := e.attacker()
	conn := testenv.AMQP(t)
	tap, err := conn.Channel()
	require.NoError(t, err)
	q, err := tap.QueueDeclare("", false, true, true, false, nil)
	require.NoError(t, err)
	require.NoError(t, tap.QueueBind(q.Name, "", amqpx.StateExchange(e.prefix), false, nil))
	tapped, err := tap.Consume(q.Name, "", true, true, false, false, nil)
	require.NoError(t, err)
	migrate := e.flip(phase.Migrate)
	e.waitDrained(migrate, ids(agents)...)
	var genuine amqp.Delivery
	waitFor(t, wait, "a signed state at the migrate epoch", func() bool {
		select {
		case d := <-tapped:
			st, err := wire.DecodeState(d.Body)
			require.NoError(t, err)
			if st.Epoch == migrate {
				genuine = d
				return true
			}
		default:
		}
		return false
	})
	require.NotEmpty(t, genuine.Headers[wire.SignatureHeader])

	g, err := holder.Enter() // the holder cannot acknowledge the contract
	require.NoError(t, err)
	contract := e.flip(phase.Contract)
	waitFor(t, wait, "the agents to apply the contract", func() bool {
		for _, a := range agents {
			if a.Stats().AppliedEpoch < contract {
				return false
			}
		}
		return true
	})
	snaps := []*agent.Snapshot{agents[0].Snapshot(), agents[1].Snapshot()}
	runner := e.runnerAsync(nil)

	t.Run("forged states and grants are rejected", func(t *testing.T) {
		forged := forgedState(t, contract+1000, phase.Migrate, e.table) // would bring the columns back
		x.toAgents(forged, nil)
		x.toAgents(forged, amqp.Table{wire.SignatureHeader: wire.Sign(otherKey, forged)})
		x.toAgents(forged, amqp.Table{wire.SignatureHeader: "!!not base64!!"})
		x.toAgents(genuine.Body, genuine.Headers) // replayed: signed, but old
		grant, err := wire.EncodeGrant(wire.Grant{AgentID: agents[1].ID(), Seq: agents[1].Stats().Seq, LeaseMS: math.MaxInt32, Epoch: contract})
		require.NoError(t, err)
		x.toAgents(grant, nil)
		for i, a := range agents {
			waitFor(t, wait, "the agent to reject them", func() bool {
				r := a.Stats().RejectedMessages
				return r[agent.RejectUnsigned] >= 2 && r[agent.RejectBadSignature] >= 2
			})
			st := a.Stats()
			require.EqualValues(t, 2, st.RejectedMessages[agent.RejectUnsigned], a.ID())
			require.EqualValues(t, 2, st.RejectedMessages[agent.RejectBadSignature], a.ID())
			require.Positive(t, st.IgnoredStates, "the replayed state was ignored as old")
			require.Same(t, snaps[i], a.Snapshot(), "agent %s changed its snapshot", a.ID())
		}
		require.GreaterOrEqual(t, asink.Count(`"reason":"unsigned"`, "message rejected"), 4)
		require.GreaterOrEqual(t, asink.Count(`"reason":"bad_signature"`, "message rejected"), 4)
		figure(t, "rejected_per_agent", 4)
		figure(t, "state_changes", 0)
	})

	t.Run("a forged acknowledgement is rejected", func(t *testing.T) {
		forged := e.statusBody(wire.Status{AgentID: holder.ID(), Seq: math.MaxInt64, AppliedEpoch: contract, DrainedEpoch: contract})
		x.toBroadcaster(forged, nil)
		x.toBroadcaster(forged, amqp.Table{wire.MACHeader: wire.MAC([]byte("not the key, but long enough for hmac"), forged)})
		x.toBroadcaster(forged, amqp.Table{wire.MACHeader: int32(7)})
		waitFor(t, wait, "the broadcaster to reject them", func() bool {
			r := b.Stats().Rejected
			return r[broadcaster.RejectUnsigned]+r[broadcaster.RejectBadSignature] >= 3
		})
		r := b.Stats().Rejected
		require.EqualValues(t, 1, r[broadcaster.RejectUnsigned])
		require.EqualValues(t, 2, r[broadcaster.RejectBadSignature])
		require.GreaterOrEqual(t, bsink.Count("status rejected"), 3)
		time.Sleep(500 * time.Millisecond)
		select {
		case rr := <-runner:
			t.Fatalf("the runner finished on a forged acknowledgement: %+v %v", rr.res, rr.err)
		default:
		}
		require.False(t, e.storeDrained(contract, holder.ID()))
		figure(t, "forged_acks_rejected", 3)
	})

	g.Exit()
	r := awaitRunner(t, runner, wait)
	e.requireDroppedAfterAcks(r, ids(agents))
	for _, a := range agents {
		require.Empty(t, a.Stats().RejectedMessages[agent.RejectUnknownSeq], "every genuine grant was accepted")
	}
}

// TestForgedAckNeedsTheToken replays the forged acknowledgement an
// outsider on the broker could once make without a status MAC key: a
// status for a live agent that has not drained, claiming it has. Without
// the victim's token it changes nothing, whether it makes up an
// incarnation or copies the victim's (which the store shows): the runner
// still waits for the victim, times out and drops nothing.
func TestForgedAckNeedsTheToken(t *testing.T) {
	t.Parallel()
	e := setup(t)
	b := e.startBroadcaster(nil)
	a := e.startAgent(e.agentConfig("victim-0", e.agentDB(2)))
	e.waitDrained(e.flip(phase.Migrate), a.ID())
	g, err := a.Enter() // still working on the old snapshot: no real ack
	require.NoError(t, err)
	defer g.Exit()
	contract := e.flip(phase.Contract)
	forged := wire.Status{AgentID: a.ID(), Seq: math.MaxInt64, AppliedEpoch: contract, DrainedEpoch: contract}
	e.attacker().toBroadcaster(e.statusBody(forged), nil)
	forged.Incarnation = e.incarnation(a.ID())
	e.attacker().toBroadcaster(e.statusBody(forged), nil)
	waitFor(t, wait, "the forgeries to be refused", func() bool {
		return b.Stats().Rejected[broadcaster.RejectUnauthenticated] >= 2
	})
	var conflicts int
	require.NoError(t, e.db.GetContext(e.ctx, &conflicts, e.sql(`SELECT count(*) FROM @store.agent_conflicts WHERE id = $1`), a.ID()))
	require.Zero(t, conflicts, "a forgery without a principal was kept as a conflict")
	require.False(t, e.storeDrained(contract, a.ID()), "the forged acknowledgement was recorded")
	r, err := e.contract(e.ctx, e.store, func(o *schema.ContractOptions) { o.Timeout = 2 * time.Second })
	require.Error(t, err)
	require.Equal(t, schema.OutcomeTimeout, r.Outcome, "the runner waits for the victim")
	require.Positive(t, a.Stats().Inflight)
	figure(t, "forged_acks_believed", 0)
}

// TestHostileInputRejected: malformed JSON, a wrong kind, wrong types, an
// unknown protocol version, a message over 1 MiB, a replay and a flood of
// 10,000, sent both to the agents (through the state exchange) and to the
// broadcaster (on the status queue). Each is rejected with a log line and a
// counter, nothing crashes and nothing changes. A status from an agent id
// the broadcaster never saw registers a new live agent: that can only make
// the runner wait longer, never drop earlier.
func TestHostileInputRejected(t *testing.T) {
	t.Parallel()
	const floodSize = 10_000
	e := setup(t)
	bsink, asink := &testenv.LogBuffer{}, &testenv.LogBuffer{}
	b := e.startBroadcaster(func(c *broadcaster.Config) { c.Logger = jsonLogger(bsink) })
	var agents []*agent.Agent
	for i, db := range []bool{true, false} {
		cfg := e.agentConfig(fmt.Sprintf("hostile-%d", i), nil)
		if db {
			cfg.DB = e.agentDB(2)
		}
		cfg.Logger = jsonLogger(asink)
		agents = append(agents, e.startAgent(cfg))
	}
	retired := e.startAgent(e.agentConfig("retired-0", nil))
	migrate := e.flip(phase.Migrate)
	e.waitDrained(migrate, append(ids(agents), retired.ID())...)
	stopAgent(t, retired)
	time.Sleep(300 * time.Millisecond) // its last statuses are recorded
	retiredRow := e.agentRow(retired.ID())
	x := e.attacker()
	big := []byte(`{"v":1,"kind":"state","epoch":1,"pad":"` + strings.Repeat("x", wire.MaxMessageSize) + `"}`)

	t.Run("agents", func(t *testing.T) {
		snaps := []*agent.Snapshot{agents[0].Snapshot(), agents[1].Snapshot()}
		before := []agent.Stats{agents[0].Stats(), agents[1].Stats()}
		x.toAgents([]byte(`{not json`), nil)
		x.toAgents([]byte(`{"v":1,"kind":"status","agent_id":"x"}`), nil)
		x.toAgents([]byte(`{"v":1,"kind":"state","epoch":"9","releases":[]}`), nil)
		x.toAgents([]byte(`{"v":99,"kind":"state","epoch":9,"releases":[]}`), nil)
		x.toAgents(big, nil)
		x.toAgents([]byte(`{"v":1,"kind":"state","epoch":-5,"releases":[]}`), nil)
		x.toAgents(forgedState(t, migrate-1, phase.Migrate, e.table), nil) // a replay of an older epoch
		grant := func(id, incarnation string) []byte {
			body, err := wire.EncodeGrant(wire.Grant{AgentID: id, Incarnation: incarnation, Seq: 12345, LeaseMS: math.MaxInt32, Epoch: migrate})
			require.NoError(t, err)
			return body
		}
		x.toAgents(grant("someone-else", ""), nil)
		x.toAgents(grant(agents[0].ID(), e.incarnation(agents[0].ID())), nil) // unknown seq for agent 0, wrong agent for agent 1
		x.flood(amqpx.StateExchange(e.prefix), "", []byte(`{not json`), floodSize)
		want := map[string]int64{
			agent.RejectMalformed: 2 + floodSize, agent.RejectKind: 1, agent.RejectVersion: 1,
			agent.RejectTooLarge: 1, agent.RejectInvalid: 1,
		}
		for i, a := range agents {
			waitFor(t, wait, "the agent to work through the flood", func() bool {
				return a.Stats().RejectedMessages[agent.RejectMalformed]-before[i].RejectedMessages[agent.RejectMalformed] >= 2+floodSize
			})
			st := a.Stats()
			for reason, n := range want {
				require.Equal(t, n, st.RejectedMessages[reason]-before[i].RejectedMessages[reason], "%s: %s", a.ID(), reason)
			}
			wantWrong, wantUnknown := int64(1), int64(1)
			if i == 1 {
				wantWrong, wantUnknown = 2, 0
			}
			require.Equal(t, wantWrong, st.RejectedMessages[agent.RejectWrongAgent]-before[i].RejectedMessages[agent.RejectWrongAgent], a.ID())
			require.Equal(t, wantUnknown, st.RejectedMessages[agent.RejectUnknownSeq]-before[i].RejectedMessages[agent.RejectUnknownSeq], a.ID())
			require.Greater(t, st.IgnoredStates, before[i].IgnoredStates, "the replay was ignored")
			require.Same(t, snaps[i], a.Snapshot(), "agent %s changed its snapshot", a.ID())
		}
		for _, reason := range []string{agent.RejectMalformed, agent.RejectKind, agent.RejectVersion, agent.RejectTooLarge, agent.RejectInvalid, agent.RejectWrongAgent, agent.RejectUnknownSeq} {
			require.Positive(t, asink.Count(`"reason":"`+reason+`"`, "message rejected"), reason)
		}
		lines := asink.Count(`"reason":"malformed"`, "message rejected")
		require.Less(t, lines, 50, "a flood of %d must not flood the log", floodSize)
		figure(t, "messages_rejected_per_agent", 2+floodSize+6)
		figure(t, "malformed_log_lines", lines)
		figure(t, "state_changes", 0)
	})

	t.Run("broadcaster", func(t *testing.T) {
		before := b.Stats()
		epochBefore := mustEpoch(t, e)
		x.toBroadcaster([]byte(`{not json`), nil)
		x.toBroadcaster([]byte(`{"v":1,"kind":"state","epoch":1,"releases":[]}`), nil)
		x.toBroadcaster([]byte(`{"v":2,"kind":"status","agent_id":"x","seq":"12"}`), nil)
		x.toBroadcaster([]byte(`{"v":3,"kind":"status","agent_id":"x","seq":12}`), nil)
		x.toBroadcaster(big, nil)
		// A replay, with the incarnation but not the token.
		x.toBroadcaster(e.statusBody(wire.Status{AgentID: retired.ID(), Incarnation: e.incarnation(retired.ID()), Seq: 1}), nil)
		// Left in the queue by an earlier run against another store, and
		// sent longer ago than a lease.
		x.toBroadcaster(e.statusBody(wire.Status{AgentID: "earlier-run", Seq: 1, StoreID: "5d0c6f0e-8a4b-4f61-9b7e-2c1f3a9d8e70"}), nil)
		x.toBroadcaster(e.statusBody(wire.Status{AgentID: "long-gone", Seq: 1, SentAt: time.Now().Add(-time.Hour)}), nil)
		x.flood("", amqpx.StatusQueue(e.prefix), []byte(`{not json`), floodSize)
		want := map[string]int64{
			broadcaster.RejectMalformed: 2 + floodSize, broadcaster.RejectKind: 1, broadcaster.RejectVersion: 1,
			broadcaster.RejectTooLarge: 1, broadcaster.RejectUnauthenticated: 1,
			broadcaster.RejectOtherStore: 1, broadcaster.RejectExpired: 1,
		}
		waitFor(t, wait, "the broadcaster to work through the flood", func() bool {
			s := b.Stats()
			for reason, n := range want {
				if s.Rejected[reason]-before.Rejected[reason] < n {
					return false
				}
			}
			return true
		})
		after := b.Stats()
		for reason, n := range want {
			if reason == broadcaster.RejectExpired {
				// Real agents' statuses can go stale too (a status through
				// the store overtaking one through the broker), or wait out
				// a lease behind the flood on a loaded machine.
				require.GreaterOrEqual(t, after.Rejected[reason]-before.Rejected[reason], n, reason)
				continue
			}
			require.Equal(t, n, after.Rejected[reason]-before.Rejected[reason], reason)
		}
		require.True(t, b.IsLeader())
		require.Equal(t, epochBefore, mustEpoch(t, e), "nothing changed the epoch")
		require.Equal(t, retiredRow, e.agentRow(retired.ID()), "the replay changed nothing")
		for _, id := range []string{"earlier-run", "long-gone"} {
			require.False(t, e.registered(id), "%s was recorded", id)
		}
		recorded := after.StatusesRecorded
		waitFor(t, wait, "real statuses to be recorded after the flood", func() bool { return b.Stats().StatusesRecorded > recorded })
		for _, reason := range []string{broadcaster.RejectMalformed, broadcaster.RejectKind, broadcaster.RejectVersion, broadcaster.RejectTooLarge} {
			require.Positive(t, bsink.Count(`"reason":"`+reason+`"`, "status rejected"), reason)
		}
		lines := bsink.Count("status rejected")
		require.Less(t, lines, 200, "a flood of %d must not flood the log", floodSize)
		figure(t, "messages_rejected", 2+floodSize+6)
		figure(t, "rejected_log_lines", lines)
		figure(t, "state_changes", 0)
	})

	// Ghost heartbeats: statuses for made-up IDs from a sender no
	// principal vouches for register nothing, so they can hold no
	// contract back; the runner waits for the real agent only.
	t.Run("ghost heartbeats register nothing", func(t *testing.T) {
		g, err := agents[0].Enter()
		require.NoError(t, err)
		contract := e.flip(phase.Contract)
		before := b.Stats().Rejected[broadcaster.RejectUnauthenticated]
		x.toBroadcaster(e.statusBody(wire.Status{AgentID: "ghost-waiting", Seq: 1}), nil)
		x.toBroadcaster(e.statusBody(wire.Status{AgentID: "ghost-acked", Seq: 1, AppliedEpoch: contract, DrainedEpoch: contract}), nil)
		// The dead agent's ID is not revived either.
		x.toBroadcaster(e.statusBody(wire.Status{AgentID: retired.ID(), Incarnation: "revenant", Seq: 1}), nil)
		waitFor(t, wait, "the ghosts to be refused", func() bool {
			return b.Stats().Rejected[broadcaster.RejectUnauthenticated]-before >= 3
		})
		for _, id := range []string{"ghost-waiting", "ghost-acked"} {
			require.False(t, e.registered(id), "%s registered", id)
		}
		require.Equal(t, retiredRow, e.agentRow(retired.ID()), "the dead agent's row was revived")
		runner := e.runnerAsync(nil)
		time.Sleep(500 * time.Millisecond)
		select {
		case rr := <-runner:
			t.Fatalf("the runner finished while a real agent had not acknowledged: %+v %v", rr.res, rr.err)
		default:
		}
		g.Exit()
		r := awaitRunner(t, runner, wait)
		e.requireDroppedAfterAcks(r, ids(agents))
		figure(t, "runner_waited", r.res.Waited)
	})
}

func mustEpoch(t *testing.T, e *env) int64 {
	t.Helper()
	n, err := e.store.Epoch(e.ctx)
	require.NoError(t, err)
	return n
}

// incarnation is the incarnation that holds an agent's registry row.
func (e *env) incarnation(id string) string {
	e.t.Helper()
	var inc string
	require.NoError(e.t, e.db.GetContext(e.ctx, &inc, e.sql(`SELECT incarnation FROM @store.agents WHERE id = $1`), id))
	return inc
}

// agentRow is an agent's registry row as JSON, for comparing.
func (e *env) agentRow(id string) string {
	e.t.Helper()
	var row []byte
	require.NoError(e.t, e.db.GetContext(e.ctx, &row, e.sql(`SELECT to_jsonb(a) FROM @store.agents a WHERE id = $1`), id))
	var v map[string]any
	require.NoError(e.t, json.Unmarshal(row, &v))
	out, err := json.Marshal(v)
	require.NoError(e.t, err)
	return string(out)
}
