package broadcaster_test

import (
	"context"
	"crypto/ed25519"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"strconv"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/broadcaster"
	"github.com/phasecast/phasecast/internal/amqpx"
	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/schema"
)

// docAgent is an agent written from docs/PROTOCOL.md alone, as one in
// another language would be: its own AMQP topology (§1), publishing
// properties (§2), hand-written JSON (§5) and signature and MAC checks
// (§8) with the standard library, and nothing of package agent or
// internal/wire.
type docAgent struct {
	t           *testing.T
	prefix      string
	id          string
	incarnation string
	token       string
	user        string
	pub         ed25519.PublicKey
	macKey      []byte
	ch          *amqp.Channel // publishing, in confirm mode
	returns     <-chan amqp.Return
	deliveries  <-chan amqp.Delivery
	seq         uint64
	storeID     string
	applied     int64
	store       *schema.Store // to look at its row, as the runner would
}

func newDocAgent(t *testing.T, store *schema.Store, prefix string, pub ed25519.PublicKey, macKey []byte) *docAgent {
	conn := testenv.AMQP(t)
	a := &docAgent{t: t, store: store, prefix: prefix, id: "doc-agent-" + testenv.Name("a"), pub: pub, macKey: macKey,
		user: amqpx.URLUser(testenv.AMQPURL()), seq: uint64(time.Now().UnixNano())}
	var incarnation [8]byte
	var token [32]byte
	_, err := rand.Read(incarnation[:])
	require.NoError(t, err)
	_, err = rand.Read(token[:])
	require.NoError(t, err)
	a.incarnation, a.token = hex.EncodeToString(incarnation[:]), hex.EncodeToString(token[:])

	sub, err := conn.Channel()
	require.NoError(t, err)
	// §1: passive declares, a server-named exclusive auto-delete queue,
	// two bindings, an auto-ack exclusive consumer.
	require.NoError(t, sub.ExchangeDeclarePassive(prefix+".state", "fanout", true, false, false, false, nil))
	require.NoError(t, sub.ExchangeDeclarePassive(prefix+".grant", "direct", true, false, false, false, nil))
	q, err := sub.QueueDeclare("", false, true, true, false, nil)
	require.NoError(t, err)
	require.NoError(t, sub.QueueBind(q.Name, "", prefix+".state", false, nil))
	require.NoError(t, sub.QueueBind(q.Name, a.id, prefix+".grant", false, nil))
	a.deliveries, err = sub.Consume(q.Name, "", true, true, false, false, nil)
	require.NoError(t, err)
	a.ch, err = conn.Channel()
	require.NoError(t, err)
	require.NoError(t, a.ch.Confirm(false))
	a.returns = a.ch.NotifyReturn(make(chan amqp.Return, 4))
	return a
}

// receive returns the next delivery of kind, its signature verified and
// its body parsed, skipping states not newer than the one held.
func (a *docAgent) receive(kind string, timeout time.Duration) map[string]any {
	t := a.t
	t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case d := <-a.deliveries:
			require.Equal(t, "application/json", d.ContentType)
			require.Equal(t, "phasecast-broadcaster", d.AppId)
			sig, _ := d.Headers["phasecast-signature"].(string)
			raw, err := base64.StdEncoding.DecodeString(sig)
			require.NoError(t, err)
			require.True(t, ed25519.Verify(a.pub, d.Body, raw), "signature of %s", d.Body)
			var m map[string]any
			require.NoError(t, json.Unmarshal(d.Body, &m))
			require.Equal(t, d.Type, m["kind"])
			if m["kind"] == "state" {
				require.EqualValues(t, 1, m["v"])
				if epoch := int64(m["epoch"].(float64)); epoch > a.applied {
					a.applied, a.storeID = epoch, m["store_id"].(string)
					if kind == "state" {
						return m
					}
				}
				continue
			}
			require.Equal(t, kind, m["kind"], "%s", d.Body)
			return m
		case <-deadline:
			require.FailNow(t, "nothing received", "waited %s for a %s", timeout, kind)
		}
	}
}

// send publishes a status as §2 has it and waits for the broker's
// confirm; extra members are added to the body.
func (a *docAgent) send(extra map[string]any) uint64 {
	t := a.t
	t.Helper()
	a.seq++
	st := map[string]any{
		"v": 2, "kind": "status", "store_id": a.storeID, "agent_id": a.id, "incarnation": a.incarnation, "token": a.token,
		"service": "doc", "host": "doc-host", "pid": 7, "version": "doc 1", "releases": []string{"L"}, "seq": a.seq,
		"applied_epoch": a.applied, "drained_epoch": a.applied, "inflight": 0, "app_name": "phasecast:" + a.id,
		"sent_at": time.Now().UTC().Format(time.RFC3339Nano),
	}
	for k, v := range extra {
		st[k] = v
	}
	body, err := json.Marshal(st)
	require.NoError(t, err)
	mac := hmac.New(sha256.New, a.macKey)
	mac.Write(body)
	msg := amqp.Publishing{
		ContentType: "application/json", Type: "status", AppId: "phasecast-agent", Timestamp: time.Now(),
		MessageId: strconv.FormatUint(a.seq, 10), UserId: a.user, Expiration: "10000", Body: body,
		Headers: amqp.Table{"phasecast-mac": base64.StdEncoding.EncodeToString(mac.Sum(nil))},
	}
	dc, err := a.ch.PublishWithDeferredConfirmWithContext(context.Background(), "", a.prefix+".status", true, false, msg)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	acked, err := dc.WaitContext(ctx)
	require.NoError(t, err)
	require.True(t, acked, "the broker nacked the status")
	select {
	case r := <-a.returns:
		require.FailNow(t, "status returned", "%d %s", r.ReplyCode, r.ReplyText)
	default:
	}
	return a.seq
}

// TestAgentFromTheProtocolDoc runs docs/PROTOCOL.md §11 against a real
// broadcaster and broker: an agent built from the document alone gets
// states, earns grants, acknowledges a flip so that the runner would count
// it, is not granted for an ack on a fresh lease, and says goodbye.
func TestAgentFromTheProtocolDoc(t *testing.T) {
	t.Parallel()
	bundle := setup(t)
	seed := make([]byte, ed25519.SeedSize)
	_, err := rand.Read(seed)
	require.NoError(t, err)
	priv := ed25519.NewKeyFromSeed(seed)
	macKey := []byte("doc agent status MAC key, 32 bytes or more")
	cfg := bundle.config(t)
	cfg.SigningKey, cfg.StatusMACKey = priv, macKey
	b := start(t, cfg)
	applyRelease(t, bundle.store, "L")
	flip(t, bundle.store, "L", phase.Migrate)

	a := newDocAgent(t, bundle.store, bundle.prefix, priv.Public().(ed25519.PublicKey), macKey)
	st := a.receive("state", 10*time.Second)
	require.Equal(t, bundle.storeID(t), a.storeID)
	require.Equal(t, "migrate", st["releases"].([]any)[0].(map[string]any)["phase"])

	// A heartbeat earns a grant for this process and seq, at the store's
	// epoch, with the broadcaster's lease.
	seq := a.send(nil)
	g := a.receive("grant", 10*time.Second)
	require.Equal(t, map[string]any{"v": float64(1), "kind": "grant", "agent_id": a.id, "incarnation": a.incarnation,
		"seq": float64(seq), "lease_ms": float64(broadcaster.DefaultLeaseDuration.Milliseconds()), "epoch": float64(a.applied)}, g)

	// The contract flip: the new state, then the ack on a fresh lease,
	// which the store records and the broadcaster does not grant.
	epoch := flip(t, bundle.store, "L", phase.Contract)
	a.receive("state", 10*time.Second)
	require.Equal(t, epoch, a.applied)
	a.send(map[string]any{"skip_grant": true})
	require.Eventually(t, func() bool {
		n, err := bundle.store.CountAcked(context.Background(), "L", epoch, a.id)
		return err == nil && n == 1
	}, 10*time.Second, 20*time.Millisecond, "the ack is recorded")
	row := a.row()
	require.Greater(t, row.LeaseRemainingMS, int64(0))
	require.Equal(t, "amqp:"+a.user, row.VouchedBy)
	require.Equal(t, a.incarnation, row.Incarnation)
	requireNoGrant(t, a, 500*time.Millisecond)

	// A status whose MAC does not match changes nothing.
	a.macKey = []byte("not the broadcaster's key, though long enough")
	a.send(nil)
	require.Eventually(t, func() bool { return b.Stats().Rejected[broadcaster.RejectBadSignature] == 1 }, 10*time.Second, 10*time.Millisecond)
	requireNoGrant(t, a, 300*time.Millisecond)
	a.macKey = macKey

	// The goodbye: no grant, and the lease is over at once.
	a.send(map[string]any{"leaving": true})
	require.Eventually(t, func() bool { return a.row().LeaseRemainingMS <= 0 }, 10*time.Second, 20*time.Millisecond, "the goodbye ends the lease")
	requireNoGrant(t, a, 300*time.Millisecond)
}

// row is the agent's row in the store.
func (a *docAgent) row() schema.Agent {
	a.t.Helper()
	agents, err := a.store.Agents(context.Background())
	require.NoError(a.t, err)
	for _, ag := range agents {
		if ag.ID == a.id {
			return ag
		}
	}
	require.FailNow(a.t, "no row", a.id)
	return schema.Agent{}
}

// requireNoGrant asserts that no grant arrives for d (beacons may).
func requireNoGrant(t *testing.T, a *docAgent, d time.Duration) {
	t.Helper()
	deadline := time.After(d)
	for {
		select {
		case m := <-a.deliveries:
			require.NotEqual(t, "grant", m.Type, "unexpected grant: %s", m.Body)
		case <-deadline:
			return
		}
	}
}
