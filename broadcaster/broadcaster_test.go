package broadcaster_test

import (
	"context"
	"crypto/ed25519"
	"encoding/json"
	"fmt"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lib/pq"
	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/broadcaster"
	"github.com/phasecast/phasecast/internal/amqpx"
	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/internal/wire"
	"github.com/phasecast/phasecast/schema"
)

// testBundle is one test's corner of the servers: its own store schema,
// its own exchange prefix, and an AMQP channel of its own.
type testBundle struct {
	store  *schema.Store
	prefix string
	conn   *amqp.Connection
	ch     *amqp.Channel
	// grantQueue is the queue replyQueue declared, which every status the
	// test sends binds to the grant exchange under its agent ID.
	grantQueue string

	storeIDOnce sync.Once
	storeIDVal  string
}

func setup(t *testing.T) *testBundle {
	t.Helper()
	bundle := &testBundle{store: testenv.Store(t), prefix: testenv.Prefix(t), conn: testenv.AMQP(t)}
	ch, err := bundle.conn.Channel()
	require.NoError(t, err)
	t.Cleanup(func() { _ = ch.Close() })
	bundle.ch = ch
	// Declared up front so that statuses published before the broadcaster
	// consumes are not dropped as unroutable.
	require.NoError(t, amqpx.DeclareStatusQueue(bundle.conn, bundle.prefix))
	return bundle
}

// config returns a Config with the short intervals the tests use.
func (tb *testBundle) config(t *testing.T) *broadcaster.Config {
	return &broadcaster.Config{
		Store:            tb.store,
		DatabaseURL:      testenv.DatabaseURL(),
		AMQPURL:          testenv.AMQPURL(),
		ExchangePrefix:   tb.prefix,
		BeaconInterval:   500 * time.Millisecond,
		PollInterval:     200 * time.Millisecond,
		LivenessInterval: 200 * time.Millisecond,
		StatusBatchWait:  20 * time.Millisecond,
		Logger:           testLogger(t),
	}
}

// testLogger writes to the test's log (shown when it fails, or with -v).
// PHASECAST_TEST_LOG=debug shows everything.
func testLogger(t *testing.T) zerolog.Logger {
	level := zerolog.InfoLevel
	if l, err := zerolog.ParseLevel(os.Getenv("PHASECAST_TEST_LOG")); err == nil && l != zerolog.NoLevel {
		level = l
	}
	return zerolog.New(zerolog.NewTestWriter(t)).Level(level).With().Timestamp().Logger()
}

// start creates and starts a broadcaster, stopped when the test ends.
func start(t *testing.T, cfg *broadcaster.Config) *broadcaster.Broadcaster {
	t.Helper()
	b, err := broadcaster.New(cfg)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	require.NoError(t, b.Start(ctx))
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		require.NoError(t, b.Stop(ctx))
	})
	return b
}

// stateConsumer binds a queue of the test's own to the state exchange, as
// an agent does, and returns its deliveries.
func (tb *testBundle) stateConsumer(t *testing.T) <-chan amqp.Delivery {
	t.Helper()
	require.NoError(t, amqpx.DeclareStateExchange(tb.ch, tb.prefix))
	q, err := tb.ch.QueueDeclare("", false, true, true, false, nil)
	require.NoError(t, err)
	require.NoError(t, tb.ch.QueueBind(q.Name, "", amqpx.StateExchange(tb.prefix), false, nil))
	deliveries, err := tb.ch.Consume(q.Name, "", true, true, false, false, nil)
	require.NoError(t, err)
	return deliveries
}

// replyQueue declares an agent's own queue for grants and returns its name
// and deliveries.
func (tb *testBundle) replyQueue(t *testing.T) (string, <-chan amqp.Delivery) {
	t.Helper()
	q, err := tb.ch.QueueDeclare("", false, true, true, false, nil)
	require.NoError(t, err)
	require.NoError(t, amqpx.DeclareGrantExchange(tb.ch, tb.prefix))
	deliveries, err := tb.ch.Consume(q.Name, "", true, true, false, false, nil)
	require.NoError(t, err)
	tb.grantQueue = q.Name
	return q.Name, deliveries
}

// publishing is a status body as an agent publishes it: with its broker
// user as user_id. The grant queue, if any, is bound under its agent ID,
// as an agent binds its own queue.
func (tb *testBundle) publishing(t *testing.T, body []byte, headers amqp.Table) amqp.Publishing {
	t.Helper()
	var id struct {
		AgentID string `json:"agent_id"`
	}
	if tb.grantQueue != "" && json.Unmarshal(body, &id) == nil && id.AgentID != "" {
		require.NoError(t, tb.ch.QueueBind(tb.grantQueue, id.AgentID, amqpx.GrantExchange(tb.prefix), false, nil))
	}
	return amqp.Publishing{ContentType: "application/json", Body: body, Headers: headers, UserId: amqpx.URLUser(testenv.AMQPURL())}
}

// waitState returns the first state that satisfies ok, verifying its
// signature when pub is set.
func waitState(t *testing.T, deliveries <-chan amqp.Delivery, pub ed25519.PublicKey, timeout time.Duration, ok func(wire.State) bool) wire.State {
	t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case d, open := <-deliveries:
			require.True(t, open, "state consumer closed")
			require.Equal(t, "application/json", d.ContentType)
			require.Equal(t, "state", d.Type)
			if pub != nil {
				sig, _ := d.Headers[wire.SignatureHeader].(string)
				require.NoError(t, wire.Verify(pub, d.Body, sig))
			}
			st, err := wire.DecodeState(d.Body)
			require.NoError(t, err)
			if ok(st) {
				return st
			}
		case <-deadline:
			require.FailNow(t, "no matching state", "waited %s", timeout)
		}
	}
}

// waitGrant returns the next grant, verifying its signature when pub is
// set.
func waitGrant(t *testing.T, deliveries <-chan amqp.Delivery, pub ed25519.PublicKey, timeout time.Duration) wire.Grant {
	t.Helper()
	select {
	case d, open := <-deliveries:
		require.True(t, open, "reply queue consumer closed")
		require.Equal(t, "grant", d.Type)
		if pub != nil {
			sig, _ := d.Headers[wire.SignatureHeader].(string)
			require.NoError(t, wire.Verify(pub, d.Body, sig))
		}
		g, err := wire.DecodeGrant(d.Body)
		require.NoError(t, err)
		return g
	case <-time.After(timeout):
		require.FailNow(t, "no grant", "waited %s", timeout)
	}
	return wire.Grant{}
}

// requireNoDelivery asserts that nothing arrives for d.
func requireNoDelivery(t *testing.T, deliveries <-chan amqp.Delivery, d time.Duration) {
	t.Helper()
	select {
	case m := <-deliveries:
		require.FailNow(t, "unexpected message", "%s", m.Body)
	case <-time.After(d):
	}
}

// applyRelease registers release name with one removal and no expand SQL.
func applyRelease(t *testing.T, store *schema.Store, name string) int64 {
	t.Helper()
	m := &schema.Manifest{Release: name, Removed: []schema.Removal{{Table: "instances", Columns: []string{"name"}}}}
	res, err := store.ApplyRelease(context.Background(), m, "test")
	require.NoError(t, err)
	return res.Epoch
}

func flip(t *testing.T, store *schema.Store, release string, to phase.Phase) int64 {
	t.Helper()
	res, err := store.Flip(context.Background(), release, to, schema.FlipOptions{Actor: "test"})
	require.NoError(t, err)
	return res.Epoch
}

// unpublishedRows counts outbox rows without published_at.
func unpublishedRows(t *testing.T, store *schema.Store) int {
	t.Helper()
	var n int
	require.NoError(t, store.DB().Get(&n, `SELECT count(*) FROM `+pq.QuoteIdentifier(store.Schema())+`.events WHERE published_at IS NULL`))
	return n
}

// status is a well-formed status of agent id, with the incarnation and
// token of an agent process.
func status(id string, seq uint64) wire.Status {
	return testenv.Credentials(wire.Status{
		AgentID: id, Service: "nova-api", Host: "host-1", PID: 4242, Version: "1.0",
		Releases: []string{"L"}, Seq: seq, SentAt: time.Now().UTC(),
	})
}

// storeID is the identity of the test's store, which statuses must name.
func (tb *testBundle) storeID(t *testing.T) string {
	t.Helper()
	id, err := tb.store.ID(context.Background())
	require.NoError(t, err)
	return id
}

// sendingStoreID is storeID read once, for the statuses statusBody
// builds: a burst must not pay a query per status. A test that migrates
// the store again names the new identity itself.
func (tb *testBundle) sendingStoreID(t *testing.T) string {
	t.Helper()
	tb.storeIDOnce.Do(func() { tb.storeIDVal = tb.storeID(t) })
	return tb.storeIDVal
}

// sendStatus publishes st to the status queue, with a MAC when key is set.
// A status that names no store is sent as of the test's store.
func (tb *testBundle) sendStatus(t *testing.T, st wire.Status, key []byte) {
	t.Helper()
	body, headers := tb.statusBody(t, st, key)
	tb.sendRaw(t, body, headers)
}

// statusBody encodes st as sendStatus sends it, with its MAC header.
func (tb *testBundle) statusBody(t *testing.T, st wire.Status, key []byte) ([]byte, amqp.Table) {
	t.Helper()
	if st.StoreID == "" {
		st.StoreID = tb.sendingStoreID(t)
	}
	body, err := wire.EncodeStatus(st)
	require.NoError(t, err)
	var headers amqp.Table
	if key != nil {
		headers = amqp.Table{wire.MACHeader: wire.MAC(key, body)}
	}
	return body, headers
}

func (tb *testBundle) sendRaw(t *testing.T, body []byte, headers amqp.Table) {
	t.Helper()
	err := tb.ch.PublishWithContext(context.Background(), "", amqpx.StatusQueue(tb.prefix), false, false, tb.publishing(t, body, headers))
	require.NoError(t, err)
}

// lockHolder returns the pid of the session holding the store's leader
// lock, or 0.
func lockHolder(t *testing.T, store *schema.Store) int {
	t.Helper()
	var pids []int
	require.NoError(t, store.DB().Select(&pids, `
		SELECT pid FROM pg_locks
		WHERE locktype = 'advisory' AND granted AND objsubid = 1
		  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
		  AND ((classid::bigint << 32) | objid::bigint) = hashtext($1)::bigint`,
		"phasecast:"+store.Schema()+":leader"))
	require.LessOrEqual(t, len(pids), 1, "the leader lock is held by more than one session")
	if len(pids) == 0 {
		return 0
	}
	return pids[0]
}

func terminate(t *testing.T, store *schema.Store, pid int) {
	t.Helper()
	var ok bool
	require.NoError(t, store.DB().Get(&ok, `SELECT pg_terminate_backend($1)`, pid))
	require.True(t, ok, "pg_terminate_backend(%d)", pid)
}

func TestNew(t *testing.T) {
	t.Parallel()
	store, err := schema.NewStore(nil, "phasecast")
	require.NoError(t, err)

	t.Run("Defaults", func(t *testing.T) {
		cfg := (&broadcaster.Config{}).WithDefaults()
		require.Equal(t, "amqp://guest:guest@localhost:5672/", cfg.AMQPURL)
		require.Equal(t, "phasecast", cfg.ExchangePrefix)
		require.Equal(t, 3*time.Second, cfg.BeaconInterval)
		require.Equal(t, time.Second, cfg.PollInterval)
		require.Equal(t, 10*time.Second, cfg.LeaseDuration)
		require.Equal(t, time.Second, cfg.LivenessInterval)
		require.Equal(t, 1000, cfg.StatusBatchMax)
		require.Equal(t, 5*time.Millisecond, cfg.StatusBatchWait)
		host, _ := os.Hostname()
		require.True(t, strings.HasPrefix(cfg.ID, fmt.Sprintf("%s-%d-", host, os.Getpid())), cfg.ID)
		require.NotEqual(t, cfg.ID, (&broadcaster.Config{}).WithDefaults().ID, "two default IDs in one process must differ")

		b, err := broadcaster.New(&broadcaster.Config{Store: store, DatabaseURL: "postgres://localhost/x"})
		require.NoError(t, err)
		require.False(t, b.IsLeader())
		require.NoError(t, b.Stop(context.Background()), "Stop before Start does nothing")
		stats := b.Stats()
		require.Len(t, stats.Rejected, 11, "every reason is present")
	})

	t.Run("Validates", func(t *testing.T) {
		valid := func() *broadcaster.Config {
			return &broadcaster.Config{Store: store, DatabaseURL: "postgres://localhost/x"}
		}
		cases := []struct {
			name   string
			modify func(*broadcaster.Config)
			want   string
		}{
			{"no store", func(c *broadcaster.Config) { c.Store = nil }, "Config.Store is required"},
			{"no database URL", func(c *broadcaster.Config) { c.DatabaseURL = "" }, "Config.DatabaseURL is required"},
			{"not an AMQP URL", func(c *broadcaster.Config) { c.AMQPURL = "http://u:s3cret@host/" }, "Config.AMQPURL"},
			{"unparsable AMQP URL", func(c *broadcaster.Config) { c.AMQPURL = "amqp://u:s3cret@[bad/" }, "Config.AMQPURL"},
			{"negative interval", func(c *broadcaster.Config) { c.BeaconInterval = -time.Second }, "Config.BeaconInterval"},
			{"negative lease", func(c *broadcaster.Config) { c.LeaseDuration = -1 }, "Config.LeaseDuration"},
			{"batch too big", func(c *broadcaster.Config) { c.StatusBatchMax = 1 << 20 }, "Config.StatusBatchMax"},
			{"short signing key", func(c *broadcaster.Config) { c.SigningKey = make([]byte, 10) }, "Config.SigningKey"},
			{"empty MAC key", func(c *broadcaster.Config) { c.StatusMACKey = []byte{} }, "Config.StatusMACKey"},
			{"long ID", func(c *broadcaster.Config) { c.ID = strings.Repeat("x", 300) }, "Config.ID"},
		}
		for _, tc := range cases {
			cfg := valid()
			tc.modify(cfg)
			_, err := broadcaster.New(cfg)
			require.ErrorIs(t, err, broadcaster.ErrInvalidConfig, tc.name)
			require.ErrorContains(t, err, tc.want, tc.name)
			require.NotContains(t, err.Error(), "s3cret", tc.name)
		}
		_, err := broadcaster.New(nil)
		require.ErrorContains(t, err, "Config.Store is required")
	})
}

func TestStartFailsFast(t *testing.T) {
	t.Parallel()
	bundle := setup(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	t.Run("UnreachableBroker", func(t *testing.T) {
		cfg := bundle.config(t)
		cfg.AMQPURL = "amqp://guest:s3cret@127.0.0.1:1/"
		b, err := broadcaster.New(cfg)
		require.NoError(t, err)
		err = b.Start(ctx)
		require.ErrorContains(t, err, "dial")
		require.NotContains(t, err.Error(), "s3cret")
		require.False(t, b.IsLeader())
		require.NoError(t, b.Stop(ctx))
	})

	t.Run("BadListenDatabaseURL", func(t *testing.T) {
		for _, dbURL := range []string{
			"postgres://postgres:s3cret@127.0.0.1:1/postgres?sslmode=disable", // nothing listens
			"postgres://postgres:s3cret@[bad/postgres",                        // url.Parse refuses it
			"postgres://postgres:s3cret@host:port/postgres",
			"host=127.0.0.1 port=1 password=s3cret",
			"host='unterminated password=s3cret",
			"password=s3cret bogus",
			"postgres://127.0.0.1:1/postgres?password=s3cret&sslmode=disable",
		} {
			cfg := bundle.config(t)
			cfg.DatabaseURL = dbURL
			b, err := broadcaster.New(cfg)
			require.NoError(t, err)
			err = b.Start(ctx)
			require.ErrorContains(t, err, "Config.DatabaseURL", dbURL)
			require.NotContains(t, err.Error(), "s3cret", dbURL)
			t.Log(err)
		}
	})

	t.Run("UnmigratedStore", func(t *testing.T) {
		store, err := schema.NewStore(bundle.store.DB(), testenv.Name("pct_none"))
		require.NoError(t, err)
		cfg := bundle.config(t)
		cfg.Store = store
		b, err := broadcaster.New(cfg)
		require.NoError(t, err)
		require.ErrorIs(t, b.Start(ctx), schema.ErrNotMigrated)
	})
}

// TestLifecycle is not parallel: it counts goroutines.
func TestLifecycle(t *testing.T) {
	bundle := setup(t)
	ctx := context.Background()
	_, grants := bundle.replyQueue(t)
	runtime.GC()
	before := runtime.NumGoroutine()

	cfg := bundle.config(t)
	a, err := broadcaster.New(cfg)
	require.NoError(t, err)
	b, err := broadcaster.New(bundle.config(t))
	require.NoError(t, err)

	for round := range 2 {
		require.NoError(t, a.Start(ctx))
		require.NoError(t, a.Start(ctx), "Start on a running broadcaster does nothing")
		require.NoError(t, b.Start(ctx))
		require.True(t, a.IsLeader())
		require.False(t, b.IsLeader())

		// A status answered means every leader goroutine is up.
		bundle.sendStatus(t, status("agent-lifecycle", uint64(round+1)), nil)
		g := waitGrant(t, grants, nil, 10*time.Second)
		require.Equal(t, uint64(round+1), g.Seq)

		require.NoError(t, a.Stop(ctx))
		require.NoError(t, a.Stop(ctx), "Stop on a stopped broadcaster does nothing")
		require.False(t, a.IsLeader())
		require.NoError(t, b.Stop(ctx))
		require.NoError(t, b.Stop(ctx))
	}

	rows, err := bundle.store.Report(ctx, 0)
	require.NoError(t, err)
	require.Empty(t, rows.Broadcasters, "Stop removes the liveness rows")
	require.Zero(t, lockHolder(t, bundle.store), "Stop releases the leader lock")

	// The broker's and the Listener's goroutines end shortly after their
	// connections close.
	var after int
	for range 100 {
		runtime.GC()
		if after = runtime.NumGoroutine(); after <= before {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if after > before {
		buf := make([]byte, 1<<20)
		buf = buf[:runtime.Stack(buf, true)]
		require.LessOrEqual(t, after, before, "goroutines leaked:\n%s", buf)
	}
}

func TestMetricsSnapshotIsACopy(t *testing.T) {
	t.Parallel()
	store, err := schema.NewStore(nil, "phasecast")
	require.NoError(t, err)
	b, err := broadcaster.New(&broadcaster.Config{Store: store, DatabaseURL: "postgres://localhost/x"})
	require.NoError(t, err)
	s := b.Stats()
	s.Rejected[broadcaster.RejectKind] = 99
	require.Zero(t, b.Stats().Rejected[broadcaster.RejectKind])
}
