package agent

import (
	"context"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/internal/wire"
	"github.com/phasecast/phasecast/schema"
)

// Manifests the tests apply. L is the design's example; Q needs quoting.
const (
	manifestL = `
release: L
removed:
  - table: instances
    columns: [name, display_name]
  - table: legacy_flavors
`
	manifestQ = `
release: 2024.06-q
removed:
  - table: nova.instances
    columns: ["Name", display name]
  - schema: Billing
    table: invoices
`
)

// testTables is what the test service registers.
func testTables() map[string][]string {
	return map[string][]string{
		"instances":        {"id", "name", "display_name", "common_name"},
		"nova.instances":   {"id", "Name", "display name", "host"},
		"Billing.invoices": {"id", "amount"},
		"legacy_flavors":   {"id", "flavor"},
	}
}

// bundle is one test's corner of the servers: its own store schema, its
// own exchange prefix, and a fake broadcaster on them.
type bundle struct {
	store  *schema.Store
	prefix string
	fake   *fakeBroadcaster
}

func setup(t *testing.T, opts fakeOptions) *bundle {
	t.Helper()
	store := testenv.Store(t)
	prefix := testenv.Prefix(t)
	return &bundle{store: store, prefix: prefix, fake: startFake(t, store, prefix, opts)}
}

// config returns a config for this bundle with short intervals, with or
// without the store's database.
func (b *bundle) config(t *testing.T, withDB bool) Config {
	cfg := Config{
		Service:           "nova-api",
		Version:           "27.1.0",
		Releases:          []string{"L"},
		Tables:            testTables(),
		Schema:            b.store.Schema(),
		AMQPURL:           testenv.AMQPURL(),
		ExchangePrefix:    b.prefix,
		HeartbeatInterval: 200 * time.Millisecond,
		LeaseMargin:       100 * time.Millisecond,
		InitialLease:      2 * time.Second,
		ConfirmInterval:   20 * time.Millisecond,
		Logger:            zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.DebugLevel),
		// The fake broadcaster signs only when a test gives it a key;
		// those tests set StateKey, and the rest forge unsigned messages
		// on purpose.
		Insecure: true,
	}
	if withDB {
		cfg.DB = b.store.DB().DB
	}
	return cfg
}

// startAgent creates and starts an agent, stopped when the test ends.
func startAgent(t *testing.T, cfg Config) *Agent {
	t.Helper()
	a, err := New(cfg)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	require.NoError(t, a.Start(ctx))
	t.Cleanup(func() { stopAgent(t, a) })
	return a
}

func stopAgent(t *testing.T, a *Agent) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	require.NoError(t, a.Stop(ctx))
}

func applyRelease(t *testing.T, store *schema.Store, manifest string) int64 {
	t.Helper()
	m, err := schema.ParseManifest("test.yaml", []byte(manifest))
	require.NoError(t, err)
	res, err := store.ApplyRelease(context.Background(), m, "test")
	require.NoError(t, err)
	return res.Epoch
}

// flip moves release through each phase in turn and returns the last epoch.
func flip(t *testing.T, store *schema.Store, release string, to ...phase.Phase) int64 {
	t.Helper()
	var epoch int64
	for _, p := range to {
		res, err := store.Flip(context.Background(), release, p, schema.FlipOptions{Actor: "test"})
		require.NoError(t, err)
		epoch = res.Epoch
	}
	return epoch
}

func waitEpoch(t *testing.T, a *Agent, epoch int64) {
	t.Helper()
	require.Eventually(t, func() bool { return a.Stats().AppliedEpoch == epoch }, 10*time.Second, 5*time.Millisecond,
		"agent never applied epoch %d (at %d)", epoch, a.Stats().AppliedEpoch)
}

func rejected(a *Agent, reason string) int64 { return a.Stats().RejectedMessages[reason] }

// barrier publishes a message the agent rejects as reason and waits until
// it has: everything published before it has then been handled, since one
// queue delivers in order.
func barrier(t *testing.T, a *Agent, f *fakeBroadcaster) {
	t.Helper()
	reason := RejectMalformed
	if a.cfg.StateKey != nil {
		reason = RejectUnsigned
	}
	before := rejected(a, reason)
	f.publishRaw([]byte("barrier"), nil)
	require.Eventually(t, func() bool { return rejected(a, reason) == before+1 }, 10*time.Second, 5*time.Millisecond)
}

// forgedState is a state a broadcaster never sent: L in phase p at epoch.
func forgedState(t testing.TB, epoch int64, p phase.Phase) []byte {
	body, err := wire.EncodeState(wire.State{Epoch: epoch, Releases: []wire.Release{{
		Name: "L", Phase: p, Removals: []wire.Removal{{Table: "instances", Columns: []string{"name", "display_name"}}},
	}}})
	require.NoError(t, err)
	return body
}

// agentRow reads the agent's row in the store.
func agentRow(t *testing.T, store *schema.Store, id string) schema.Agent {
	t.Helper()
	agents, err := store.Agents(context.Background())
	require.NoError(t, err)
	for _, ag := range agents {
		if ag.ID == id {
			return ag
		}
	}
	require.FailNow(t, "agent not registered in the store", id)
	return schema.Agent{}
}

// newTestAgent returns an agent that holds a state at epoch 1 and a lease,
// built without any server, for unit tests and benchmarks. It is never
// started: nothing renews or expires the lease.
func newTestAgent(tb testing.TB, st *wire.State) *Agent {
	tb.Helper()
	a, err := New(Config{Insecure: true, Service: "bench", Tables: testTables()})
	require.NoError(tb, err)
	a.apply(st)
	a.drained.Store(st.Epoch)
	a.setRunning(true)
	require.True(tb, a.extendLease(time.Now(), time.Hour))
	return a
}

// runDrainer runs the agent's drainer, as Start would, until the test ends.
func runDrainer(tb testing.TB, a *Agent) *runState {
	ctx, cancel := context.WithCancel(context.Background())
	r := &runState{ctx: ctx, cancel: cancel, ready: make(chan struct{})}
	r.wg.Go(func() { a.drainLoop(r) })
	tb.Cleanup(func() { cancel(); r.wg.Wait() })
	return r
}

func stateL(epoch int64, p phase.Phase) *wire.State {
	return &wire.State{Epoch: epoch, Releases: []wire.Release{{
		Name: "L", Phase: p, Removals: []wire.Removal{
			{Table: "instances", Columns: []string{"name", "display_name"}},
			{Table: "legacy_flavors"},
		},
	}}}
}
