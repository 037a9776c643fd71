package broadcaster

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lib/pq"
	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/rs/zerolog"

	"github.com/phasecast/phasecast/internal/amqpx"
	"github.com/phasecast/phasecast/internal/config"
	"github.com/phasecast/phasecast/internal/wire"
)

// ErrStopping is returned by Start while an earlier Stop, whose context
// ran out, is still winding the broadcaster down.
var ErrStopping = errors.New("broadcaster: still stopping; call Stop again to wait for it")

const (
	// dbTimeout bounds each database call of the background loops, so a
	// hung connection delays a loop, never stops it.
	dbTimeout = 10 * time.Second
	// confirmTimeout is how long a published state may wait for the
	// broker's confirm before the publishing connection is deemed broken.
	confirmTimeout = 10 * time.Second
	// cleanupTimeout bounds the lock release and the liveness row removal
	// on Stop; they run even if Stop's own context has run out.
	cleanupTimeout = 5 * time.Second
	// appID marks every message the broadcaster sends.
	appID = "phasecast-broadcaster"
)

// Broadcaster relays the store's state to agents and records their
// statuses. Create one with New; its methods are safe for concurrent use.
type Broadcaster struct {
	cfg    *Config
	log    zerolog.Logger
	host   string
	pid    int
	stats  *counters
	leader atomic.Bool
	// metrics is the broadcaster's Prometheus registry and what only it
	// observes; metricsSrv serves it while running (Config.MetricsAddr).
	metrics    *metrics
	metricsSrv *metricsServer // under mu
	// storeID is the store's identity (schema.Store.ID), which statuses
	// must name: read by Start, then with every state the relay reads, so
	// the check follows a store dropped and migrated again under a
	// running broadcaster, as the states the agents learn it from do.
	storeID atomic.Pointer[string]

	mu       sync.Mutex // serializes Start and Stop
	cancel   context.CancelFunc
	done     chan struct{} // closed when the run goroutine has exited; nil while stopped
	stopping bool          // Stop cancelled the run but has not seen it end
}

// New validates cfg, fills in its defaults and returns a stopped
// broadcaster. It connects to nothing: Start does.
func New(cfg *Config) (*Broadcaster, error) {
	if cfg == nil {
		cfg = &Config{}
	}
	c := cfg.WithDefaults()
	if err := c.validate(); err != nil {
		return nil, err
	}
	b := &Broadcaster{
		cfg:   c,
		log:   c.Logger.With().Str("component", "broadcaster").Str("broadcaster_id", c.ID).Str("schema", c.Store.Schema()).Logger(),
		host:  config.Hostname(),
		pid:   os.Getpid(),
		stats: newCounters(),
	}
	b.metrics = newMetrics(b)
	return b, nil
}

// ID returns the broadcaster's ID, as in the store's broadcasters table.
func (b *Broadcaster) ID() string { return b.cfg.ID }

// IsLeader reports whether the broadcaster holds the leader lock and runs
// the relay and the status consumer.
func (b *Broadcaster) IsLeader() bool { return b.leader.Load() }

// Stats returns a snapshot of the broadcaster's counters.
func (b *Broadcaster) Stats() Stats { return b.stats.snapshot() }

// Start checks that the store, its database and the broker can be reached
// (failing fast with an error that says which could not), tries once for
// leadership, writes the liveness row, and returns with the broadcaster
// running in the background: as leader if it won the lock, else as a
// standby that keeps trying. ctx bounds the start-up only; the broadcaster
// runs until Stop. Calling Start on a running broadcaster does nothing.
// Behind a transaction pooler, where neither the leader lock nor LISTEN
// stays on the broadcaster's session, it refuses to start with a
// *schema.PoolerError (schema.ErrTransactionPooler) that says what to do.
func (b *Broadcaster) Start(ctx context.Context) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.done != nil {
		if b.stopping {
			return ErrStopping
		}
		return nil
	}
	ms, err := b.startMetrics()
	if err != nil {
		return err
	}
	defer func() { // kept only if the broadcaster started
		if b.done == nil {
			ms.stop()
		} else {
			b.metricsSrv = ms
		}
	}()
	if err := b.preflight(ctx); err != nil {
		return err
	}
	runCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	r := newRunner(b)
	// The first round is bounded by ctx; what it started (a term) lives
	// on under runCtx.
	unwatch := context.AfterFunc(ctx, cancel)
	r.tick(runCtx)
	if !unwatch() {
		r.shutdown(runCtx)
		cancel()
		return fmt.Errorf("broadcaster: start: %w", ctx.Err())
	}
	if r.refused != nil {
		r.shutdown(runCtx)
		cancel()
		return fmt.Errorf("broadcaster: %w", r.refused)
	}
	if b.IsLeader() {
		b.log.Info().Msg("broadcaster started as leader")
	} else {
		b.log.Info().Msg("broadcaster started as standby: another broadcaster leads")
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		r.run(runCtx)
	}()
	b.cancel, b.done, b.stopping = cancel, done, false
	return nil
}

// Stop stops leader work, releases the leader lock (a standby takes over
// within its LivenessInterval), removes the liveness row and waits for
// every goroutine to end. If ctx ends first it returns ctx's error and the
// broadcaster finishes stopping in the background; calling Stop again
// waits for it. Stop on a stopped broadcaster does nothing.
func (b *Broadcaster) Stop(ctx context.Context) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.done == nil {
		return nil
	}
	b.stopping = true
	b.cancel()
	select {
	case <-b.done:
	case <-ctx.Done():
		return ctx.Err()
	}
	b.cancel, b.done, b.stopping = nil, nil, false
	b.metricsSrv.stop()
	b.metricsSrv = nil
	b.log.Info().Msg("broadcaster stopped")
	return nil
}

// preflight fails fast on what no retry will fix: an unmigrated store, a
// LISTEN connection string that does not connect or whose LISTEN does not
// hear a NOTIFY (probeListen), a broker that refuses us. It reads the
// store's identity, which statuses must name.
func (b *Broadcaster) preflight(ctx context.Context) error {
	id, err := b.cfg.Store.ID(ctx)
	if err != nil {
		return fmt.Errorf("broadcaster: read the store: %w", err)
	}
	b.noteStoreID(id)
	connector, err := pq.NewConnector(b.cfg.DatabaseURL)
	if err != nil {
		return fmt.Errorf("broadcaster: Config.DatabaseURL %s: %w", config.Redact(b.cfg.DatabaseURL), config.RedactError(err, b.cfg.DatabaseURL))
	}
	conn, err := connector.Connect(ctx)
	if err != nil {
		return fmt.Errorf("broadcaster: connect to Config.DatabaseURL %s: %w", config.Redact(b.cfg.DatabaseURL), config.RedactError(err, b.cfg.DatabaseURL))
	}
	_ = conn.Close()
	if err := b.probeListen(ctx); err != nil {
		return fmt.Errorf("broadcaster: %w", err)
	}
	ac, err := amqpx.Dial(b.cfg.AMQPURL, b.connName("preflight"))
	if err != nil {
		return fmt.Errorf("broadcaster: %w", err)
	}
	_ = ac.Close()
	return nil
}

// noteStoreID records the store's identity as last read. A change means
// the store was dropped and migrated again: statuses of the old one are
// dropped from now on.
func (b *Broadcaster) noteStoreID(id string) {
	if id == "" {
		return // a store that predates identities cannot be read at all
	}
	if old := b.storeID.Swap(&id); old != nil && *old != id {
		b.log.Warn().Str("store_id", id).Str("previous_store_id", *old).Msg("the store's identity changed (dropped and migrated again?): statuses of the previous store are dropped")
	}
}

// amqpURLs lists the broker nodes of Config.AMQPURL.
func (b *Broadcaster) amqpURLs() []string { return config.SplitURLs(b.cfg.AMQPURL) }

// connName is how a connection shows in the broker's management UI.
func (b *Broadcaster) connName(purpose string) string {
	return "phasecast-broadcaster " + b.cfg.ID + " " + purpose
}

// message wraps a body as the broadcaster sends it, signed when a key is
// configured.
func (b *Broadcaster) message(kind wire.Kind, body []byte) amqp.Publishing {
	var sig string
	if b.cfg.SigningKey != nil {
		sig = wire.Sign(b.cfg.SigningKey, body)
	}
	return amqpx.Publishing(appID, kind, body, sig)
}

// failureLog turns a stream of results into few log lines: the first
// failure of a streak at Warn, the rest at Debug, the recovery at Info. An
// outage is then one line, not one per tick. Each instance belongs to one
// goroutine.
type failureLog struct {
	what     string
	failures int
}

func (f *failureLog) report(log zerolog.Logger, err error) {
	if err == nil {
		if f.failures > 0 {
			log.Info().Int("failures", f.failures).Msg(f.what + " recovered")
			f.failures = 0
		}
		return
	}
	// Whatever a driver or the broker quoted, no password is logged.
	err = config.RedactError(err)
	f.failures++
	if f.failures == 1 {
		log.Warn().Err(err).Msg(f.what + " failed; retrying")
		return
	}
	log.Debug().Err(err).Int("failures", f.failures).Msg(f.what + " failed again")
}

// closeOnDone closes conn when ctx ends, so an AMQP call blocked on an
// unresponsive broker returns and the session can end. The returned
// function stops the watch and waits for it.
func closeOnDone(ctx context.Context, conn *amqp.Connection) (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		select {
		case <-ctx.Done():
			_ = amqpx.CloseBounded(conn)
		case <-done:
		}
	})
	return func() {
		close(done)
		wg.Wait()
	}
}

// closedError describes why a NotifyClose channel fired: with the
// broker's error, or nil for an orderly close.
func closedError(what string, err *amqp.Error) error {
	if err == nil {
		return fmt.Errorf("%s closed", what)
	}
	return fmt.Errorf("%s closed: %w", what, err)
}
