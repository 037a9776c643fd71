package agent

import (
	"context"
	"crypto/ed25519"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/amqpx"
	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/internal/wire"
	"github.com/phasecast/phasecast/schema"
)

// fakeBroadcaster plays the broadcaster in these tests, with raw amqp091
// on the real broker and the real store: it records each status with
// Store.RecordStatusBatch and answers with a grant (unless the status skips
// it, as the broadcaster does), and publishes the store's
// state as beacons. Tests turn each duty on and off, and publish what a
// broadcaster never would.
type fakeBroadcaster struct {
	t      testing.TB
	store  *schema.Store
	prefix string
	lease  time.Duration
	signer ed25519.PrivateKey // signs states and grants when set
	macKey []byte             // checks status MACs when set

	answering atomic.Bool // answer statuses with grants
	beaconMu  sync.Mutex  // held across each beacon, so setBeacons(false) waits out one in flight
	beaconing bool        // under beaconMu: publish the store's state every beaconTick

	pubMu sync.Mutex
	pub   *amqp.Channel

	mu       sync.Mutex
	statuses []receivedStatus
	badMACs  int

	cancel context.CancelFunc
	wg     sync.WaitGroup
}

type receivedStatus struct {
	wire.Status
	at         time.Time
	expiration string // the AMQP per-message TTL, in ms
}

type fakeOptions struct {
	lease      time.Duration // defaults to 2s
	signer     ed25519.PrivateKey
	macKey     []byte
	noBeacons  bool // start with beacons off
	noAnswer   bool // start without answering
	beaconTick time.Duration
}

const defaultBeaconTick = 100 * time.Millisecond

func startFake(t testing.TB, store *schema.Store, prefix string, opts fakeOptions) *fakeBroadcaster {
	t.Helper()
	if opts.lease == 0 {
		opts.lease = 2 * time.Second
	}
	if opts.beaconTick == 0 {
		opts.beaconTick = defaultBeaconTick
	}
	conn := testenv.AMQP(t)
	require.NoError(t, amqpx.DeclareStatusQueue(conn, prefix))
	pub, err := conn.Channel()
	require.NoError(t, err)
	require.NoError(t, amqpx.DeclareStateExchange(pub, prefix))
	require.NoError(t, amqpx.DeclareGrantExchange(pub, prefix))
	sub, err := conn.Channel()
	require.NoError(t, err)
	deliveries, err := sub.Consume(amqpx.StatusQueue(prefix), "", true, false, false, false, nil)
	require.NoError(t, err)

	ctx, cancel := context.WithCancel(context.Background())
	f := &fakeBroadcaster{t: t, store: store, prefix: prefix, lease: opts.lease, signer: opts.signer, macKey: opts.macKey, pub: pub, cancel: cancel}
	f.answering.Store(!opts.noAnswer)
	f.beaconing = !opts.noBeacons
	f.wg.Go(func() {
		for {
			select {
			case <-ctx.Done():
				return
			case d, ok := <-deliveries:
				if !ok {
					return
				}
				f.onStatus(ctx, d)
			}
		}
	})
	f.wg.Go(func() {
		tick := time.NewTicker(opts.beaconTick)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
				f.beaconMu.Lock()
				if f.beaconing {
					f.beacon(ctx)
				}
				f.beaconMu.Unlock()
			}
		}
	})
	t.Cleanup(func() {
		cancel()
		_ = sub.Close()
		f.wg.Wait()
	})
	return f
}

func (f *fakeBroadcaster) onStatus(ctx context.Context, d amqp.Delivery) {
	if f.macKey != nil {
		mac, _ := d.Headers[wire.MACHeader].(string)
		if wire.CheckMAC(f.macKey, d.Body, mac) != nil {
			f.mu.Lock()
			f.badMACs++
			f.mu.Unlock()
			return
		}
	}
	st, err := wire.DecodeStatus(d.Body)
	if err != nil {
		f.t.Errorf("fake broadcaster: agent sent an invalid status: %v", err)
		return
	}
	f.mu.Lock()
	f.statuses = append(f.statuses, receivedStatus{Status: st, at: time.Now(), expiration: d.Expiration})
	f.mu.Unlock()
	if !f.answering.Load() {
		return
	}
	// As the broadcaster: the sender is the broker user in user_id.
	sent := schema.Sent{Status: st}
	if d.UserId != "" {
		sent.Principal = schema.PrincipalAMQP + ":" + d.UserId
	}
	rec, err := f.store.RecordSent(ctx, []schema.Sent{sent}, f.lease, false)
	if err != nil {
		if ctx.Err() == nil {
			f.t.Errorf("fake broadcaster: RecordSent: %v", err)
		}
		return
	}
	if !rec.Has(st.AgentID, st.Incarnation) {
		return // a replayed or conflicting status: no grant
	}
	epoch := rec.Epoch
	if !st.WantsGrant(epoch) {
		return // as the broadcaster: an ack on a fresh lease
	}
	body, err := wire.EncodeGrant(wire.Grant{AgentID: st.AgentID, Incarnation: st.Incarnation, Seq: st.Seq, LeaseMS: f.lease.Milliseconds(), Epoch: epoch})
	if err != nil {
		f.t.Errorf("fake broadcaster: %v", err)
		return
	}
	f.sendGrant(st.AgentID, body, f.sign(body))
}

// setBeacons turns beacons on or off. Once it returns after turning them
// off, no beacon is in flight: a flip made now reaches no agent.
func (f *fakeBroadcaster) setBeacons(on bool) {
	f.beaconMu.Lock()
	f.beaconing = on
	f.beaconMu.Unlock()
}

// beacon publishes the store's current state.
func (f *fakeBroadcaster) beacon(ctx context.Context) {
	st, err := f.store.State(ctx)
	if err != nil {
		if ctx.Err() == nil {
			f.t.Errorf("fake broadcaster: State: %v", err)
		}
		return
	}
	f.publishState(st)
}

// publishState publishes st, signed if the fake has a key.
func (f *fakeBroadcaster) publishState(st wire.State) {
	body, err := wire.EncodeState(st)
	require.NoError(f.t, err)
	f.publishRaw(body, f.sign(body))
}

// publishNow publishes the store's current state at once.
func (f *fakeBroadcaster) publishNow() {
	f.beacon(context.Background())
}

// publishRaw puts body on the state exchange as it is.
func (f *fakeBroadcaster) publishRaw(body []byte, headers amqp.Table) {
	f.send(amqpx.StateExchange(f.prefix), "", body, headers)
}

// sendGrant routes a grant to agent id's queue, as the broadcaster does.
func (f *fakeBroadcaster) sendGrant(id string, body []byte, headers amqp.Table) {
	f.send(amqpx.GrantExchange(f.prefix), id, body, headers)
}

func (f *fakeBroadcaster) send(exchange, key string, body []byte, headers amqp.Table) {
	f.pubMu.Lock()
	defer f.pubMu.Unlock()
	err := f.pub.PublishWithContext(context.Background(), exchange, key, false, false, amqp.Publishing{Body: body, Headers: headers})
	if err != nil {
		f.t.Errorf("fake broadcaster: publish: %v", err)
	}
}

func (f *fakeBroadcaster) sign(body []byte) amqp.Table {
	if f.signer == nil {
		return nil
	}
	return amqp.Table{wire.SignatureHeader: wire.Sign(f.signer, body)}
}

// received returns the statuses received so far.
func (f *fakeBroadcaster) received() []receivedStatus {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]receivedStatus(nil), f.statuses...)
}

// waitStatus waits for a status after the first `from` received that
// satisfies ok, and returns it.
func (f *fakeBroadcaster) waitStatus(t testing.TB, from int, timeout time.Duration, ok func(wire.Status) bool) receivedStatus {
	t.Helper()
	var found receivedStatus
	require.Eventually(t, func() bool {
		all := f.received()
		for _, s := range all[min(from, len(all)):] {
			if ok(s.Status) {
				found = s
				return true
			}
		}
		return false
	}, timeout, 5*time.Millisecond, "no matching status arrived")
	return found
}

func (f *fakeBroadcaster) lastStatus(t testing.TB) wire.Status {
	t.Helper()
	all := f.received()
	require.NotEmpty(t, all)
	return all[len(all)-1].Status
}
