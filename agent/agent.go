package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/rs/zerolog"

	"github.com/phasecast/phasecast/internal/amqpx"
	"github.com/phasecast/phasecast/internal/wire"
	"github.com/phasecast/phasecast/schema"
)

// ErrStale is returned by Enter when the agent cannot vouch that its
// snapshot is current: its lease ran out (the broadcaster stopped
// answering, or this process was partitioned) and it has no database to
// re-sync from, or the re-sync failed, or the agent is not running. The
// service should refuse the unit of work (e.g. answer 503) rather than run
// it on a state the contract runner may no longer be waiting for.
var ErrStale = errors.New("agent: state may be stale: the lease ran out")

var errNotRunning = fmt.Errorf("%w (the agent holds no state or is not running: Enter only after Start returned, and before Stop)", ErrStale)

// syncTimeout bounds each of the agent's own store calls (SyncAgent,
// StateDigest).
const syncTimeout = 5 * time.Second

// Agent holds the versioning state for one service and keeps it current.
// All its methods are safe for concurrent use.
type Agent struct {
	// Read by every Enter and Snapshot: together, and away from the
	// fields the agent's own goroutines write.
	cur    atomic.Pointer[Snapshot]
	fenced atomic.Bool
	// leaseEnd is the lease deadline on the tick clock (clock.go), which
	// Enter reads itself rather than trust the timer to have fenced; 0
	// while fenced. Written under leaseMu.
	leaseEnd atomic.Int64
	_        [64]byte

	cfg   Config
	log   zerolog.Logger
	store *schema.Store // nil without Config.DB
	reg   *registry
	pid   int
	// incarnation is random per New: this process's identity beside
	// Config.ID (wire.Status.Incarnation).
	incarnation string
	// token is the secret drawn with the incarnation (wire.Status.Token):
	// the store binds the agent's row to its hash. Never logged.
	token string
	// brokerUser is the broker user the agent's connection logs in as: its
	// statuses carry it as user_id, which RabbitMQ checks, so the store
	// knows which principal vouches for the agent.
	brokerUser string

	drain       chan struct{} // wakes the drainer; 1-buffered
	leasePoke   chan struct{} // wakes the lease timer; 1-buffered
	confirmPoke chan struct{} // wakes the confirmer; 1-buffered

	life   sync.Mutex // serializes Start and Stop
	run    *runState  // under life; nil when not running
	last   *runState  // under life; the previous run, joined before the next Start
	runPtr atomic.Pointer[runState]

	applyMu   sync.Mutex // serializes apply
	pendingMu sync.Mutex
	pending   []*Snapshot  // under pendingMu: retired snapshots that may still have guards
	notified  *Snapshot    // under pendingMu: the snapshot OnChange last saw
	drained   atomic.Int64 // written under pendingMu
	appliedAt time.Time    // under pendingMu: when the current snapshot was applied (Stats.AckDelays)

	// Every status, over AMQP or through the store, is numbered and sent
	// under statusMu, so seqs reach the store in order.
	statusMu     sync.Mutex
	seq          atomic.Uint64 // written under statusMu; starts at seqBase
	seqBase      uint64
	syncGen      atomic.Uint64 // bumped by every Store.SyncAgent attempt
	lastSyncErr  error         // under statusMu
	lastSyncFail time.Time     // under statusMu
	ignoredNote  string        // under statusMu: the last ignored-status reason logged at warn
	ignoredAt    time.Time     // under statusMu: when it was

	sentMu sync.Mutex
	sent   [sentRing]sentStatus

	leaseMu  sync.Mutex
	running  bool      // under leaseMu: the lease may unfence only while running
	deadline time.Time // under leaseMu; monotonic; never moves backwards
	leaseMS  atomic.Int64

	sessMu sync.RWMutex
	sess   *session

	confirmHint atomic.Int64

	resyncMu  sync.Mutex
	resyncCur *resync // under resyncMu: the fenced Enter's re-sync in flight
	// candidate is the newest state message awaiting confirmation (with a
	// DB): applied as it is if the store's digest matches it.
	candidate atomic.Pointer[wire.State]
	// warnedNoDigest: the store's missing digest column was logged once.
	warnedNoDigest atomic.Bool
	// storeID is the identity of the store the statuses name (see
	// learnStore); nil until known.
	storeID atomic.Pointer[string]

	counters

	hooks testHooks
}

// testHooks let the package's tests make an interleaving deterministic or
// simulate a paused process. Production code never sets them.
type testHooks struct {
	afterResync       func()      // enterFenced: between the re-sync and the pin
	beforeGoodbye     func()      // Stop: just before the goodbye
	leaseTimerStopped atomic.Bool // leaseLoop does not fence, as in a paused process
}

// runState is one Start…Stop period.
type runState struct {
	ctx       context.Context
	cancel    context.CancelFunc
	wg        sync.WaitGroup
	ready     chan struct{}
	readyOnce sync.Once
	sessions  atomic.Int64

	spawnMu sync.Mutex
	ended   bool // under spawnMu: wg is being waited on; spawn no more

	// hush, closed by Stop before its goodbye, ends the goroutines that
	// send statuses on their own (the heartbeat and the drainer), and
	// reporters lets Stop wait for them: a status sent after the goodbye
	// carries a higher seq, and the store would renew the lease the
	// goodbye ended.
	hush      chan struct{}
	reporters sync.WaitGroup
}

func (r *runState) markReady() { r.readyOnce.Do(func() { close(r.ready) }) }

// spawn runs f on the run's wait group unless the run is ending, and
// reports whether it did. Goroutines started after Start (not by it) go
// through here, so none is added while Stop waits.
func (r *runState) spawn(f func()) bool {
	r.spawnMu.Lock()
	defer r.spawnMu.Unlock()
	if r.ended {
		return false
	}
	r.wg.Go(f)
	return true
}

// end cancels the run and stops spawn; then the wait group can be waited on.
func (r *runState) end() {
	r.spawnMu.Lock()
	r.ended = true
	r.spawnMu.Unlock()
	r.cancel()
}

// sentRing is how many recent statuses the agent remembers the send time
// of, to match grants against: at the default heartbeat, over two minutes.
const sentRing = 64

type sentStatus struct {
	seq uint64
	at  time.Time // local, monotonic
}

// New validates cfg, applies its defaults and returns an agent that is not
// yet running. It does not connect to anything.
func New(cfg Config) (*Agent, error) {
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("agent: invalid config: %w", err)
	}
	calibrateClock()
	cfg.Releases = slices.Clone(cfg.Releases)
	if cfg.Releases == nil {
		cfg.Releases = []string{}
	}
	cfg.StateKey = slices.Clone(cfg.StateKey)
	cfg.StatusMACKey = slices.Clone(cfg.StatusMACKey)
	a := &Agent{
		cfg:         cfg,
		log:         cfg.Logger.With().Str("agent_id", cfg.ID).Str("service", cfg.Service).Logger(),
		reg:         newRegistry(cfg.Tables),
		pid:         os.Getpid(),
		drain:       make(chan struct{}, 1),
		leasePoke:   make(chan struct{}, 1),
		confirmPoke: make(chan struct{}, 1),
	}
	a.cfg.Tables = nil // the registry holds its own copy
	if cfg.DB != nil {
		store, err := schema.NewStore(sqlx.NewDb(cfg.DB, "postgres"), cfg.Schema)
		if err != nil {
			return nil, fmt.Errorf("agent: Config.Schema: %w", err)
		}
		a.store = store
	}
	// The incarnation tells this process from any other configured with
	// the same ID (a hard-coded ID, a replaced pod overlapping the old
	// one): the store orders seqs within one incarnation only, keeps one
	// incarnation per ID while its lease is live, and reports the other as
	// a conflict (schema.Agent.Rivals) instead of recording it. So a
	// restarted agent is never taken for a replay of its former self,
	// whatever the wall clock did across the restart. Seqs still start at
	// the creation time in nanoseconds, which is what ordered a successor
	// above its predecessor before incarnations, for broadcasters built
	// before them, which order by seq alone.
	if cfg.StateKey == nil {
		a.log.Warn().Msg(InsecureAgentWarning)
	}
	a.incarnation = randomHex(8)
	a.token = randomHex(wire.TokenSize)
	if cfg.Connection != nil {
		a.brokerUser = cfg.Connection.user
	} else {
		a.brokerUser = amqpx.URLUser(cfg.AMQPURL)
	}
	a.seqBase = uint64(time.Now().UnixNano())
	a.seq.Store(a.seqBase)
	a.fenced.Store(true)
	a.drained.Store(-1)
	return a, nil
}

// ID returns the agent's ID.
func (a *Agent) ID() string { return a.cfg.ID }

// ApplicationName returns the application_name the agent reports; the
// service's own database sessions should carry it.
func (a *Agent) ApplicationName() string { return a.cfg.ApplicationName }

// Snapshot returns the current snapshot: one atomic load. It is nil until
// Start has loaded a state. A unit of work that must not see the state
// change under it (a request, a transaction) uses Enter instead.
func (a *Agent) Snapshot() *Snapshot { return a.cur.Load() }

// Table returns the handle of a table registered in Config.Tables. Resolve
// each table once, at start-up; the handle works with every snapshot of
// this agent. It panics if the table is not registered, as regexp's
// MustCompile does: the set of tables is fixed when the service is built.
func (a *Agent) Table(name string) TableRef {
	t, ok := a.reg.index[name]
	if !ok {
		panic(fmt.Sprintf("agent: table %q is not registered in Config.Tables (registered: %q)", name, a.reg.names))
	}
	return t
}

// Column returns the handle of a column of a table registered in
// Config.Tables, for Snapshot.ColumnRemoved. Resolve each column once, at
// start-up. It panics if the table is not registered or does not list the
// column.
func (a *Agent) Column(table, column string) ColumnRef {
	t := a.Table(table)
	i := slices.Index(a.reg.columns[t.index()], column)
	if i < 0 {
		panic(fmt.Sprintf("agent: column %q is not registered for table %q in Config.Tables (registered: %q)", column, table, a.reg.columns[t.index()]))
	}
	return ColumnRef{i: int32(a.reg.colBase[t.index()] + i + 1)}
}

// Start loads the state and connects, and returns once the agent can vouch
// for its snapshot. The service should not serve before Start returns.
//
// With Config.DB, Start first reads the state from the store and registers
// the agent's lease there (Store.SyncAgent), then connects to the broker
// and waits for the broadcaster's first lease grant. If the broker cannot
// be reached at all, Start returns after the store sync alone: the lease
// comes from the store, the agent keeps renewing it there and reconnects to
// the broker in the background. Without a DB, Start waits for the first
// state (the broadcaster sends one every few seconds as a beacon) and then
// for a grant of a lease on it.
//
// If another live process holds Config.ID, the store reads out the state
// but records none of this agent's statuses (schema.ErrStatusIgnored):
// Start then waits, fenced, until that process's lease ends or it says
// goodbye and a status of this one is recorded, and the error on timeout
// says who holds the ID.
//
// ctx bounds the wait; if it ends first, Start undoes everything and
// returns an error. Calling Start on a running agent does nothing. An
// agent may be started again after Stop.
func (a *Agent) Start(ctx context.Context) error {
	a.life.Lock()
	defer a.life.Unlock()
	if a.run != nil {
		return nil
	}
	if prev := a.last; prev != nil {
		if err := waitGroup(ctx, &prev.wg); err != nil {
			return fmt.Errorf("agent: start: the previous run has not stopped yet: %w", err)
		}
		a.last = nil
	}
	runCtx, cancel := context.WithCancel(context.Background())
	r := &runState{ctx: runCtx, cancel: cancel, ready: make(chan struct{}), hush: make(chan struct{})}
	a.setRunning(true)
	a.runPtr.Store(r)

	// ignored is set when the store read out the state but ignored the
	// start status (another live process holds the ID): the agent stays
	// fenced and waits, like an agent without a DB, for a grant, which
	// comes once the store records one of its statuses.
	var ignored error
	if a.store != nil {
		a.statusMu.Lock()
		err := a.syncLocked(ctx, "start")
		a.statusMu.Unlock()
		if errors.Is(err, schema.ErrStatusIgnored) {
			ignored, err = err, nil
		}
		if err != nil {
			a.halt(r)
			return fmt.Errorf("agent: start: load state from the store (schema %q): %w", a.cfg.Schema, err)
		}
		// Nothing older can be in flight on a first start, so the state
		// just loaded is drained as it stands; the first status says so.
		a.pendingMu.Lock()
		a.pending = pruneDrained(a.pending)
		if cur := a.cur.Load(); len(a.pending) == 0 && cur.epoch > a.drained.Load() {
			a.drained.Store(cur.epoch)
		}
		if a.notified == nil {
			a.notified = a.cur.Load()
		}
		a.pendingMu.Unlock()
	}

	conn, dialErr := a.dialBroker(ctx)
	r.reporters.Add(2)
	r.wg.Go(func() { defer r.reporters.Done(); a.drainLoop(r) })
	r.wg.Go(func() { a.leaseLoop(r) })
	r.wg.Go(func() { defer r.reporters.Done(); a.heartbeatLoop(r) })
	if a.store != nil {
		r.wg.Go(func() { a.confirmLoop(r) })
	}
	r.wg.Go(func() { a.amqpLoop(r, conn) })

	if dialErr != nil {
		if a.store != nil && ignored != nil {
			// The heartbeats retry through the store; the ID is ours once
			// the other process's lease is over.
			if err := a.awaitLease(ctx); err != nil {
				a.halt(r)
				a.statusMu.Lock()
				ignored = a.lastSyncErr
				a.statusMu.Unlock()
				return fmt.Errorf("agent: start: broker unreachable (%v), and waiting for a lease from the store: %w (%w)", dialErr, err, ignored)
			}
		}
		if a.store != nil {
			a.log.Warn().Err(dialErr).Msg("broker unreachable; running on the store's lease and reconnecting in the background")
			a.run = r
			return nil
		}
		a.log.Warn().Err(dialErr).Msg("broker unreachable; retrying until Start's context ends")
	}
	select {
	case <-r.ready:
		a.run = r
		snap := a.cur.Load()
		a.log.Info().Int64("epoch", snap.epoch).Msg("agent started")
		return nil
	case <-ctx.Done():
		a.halt(r)
		what := "the first lease grant from the broadcaster"
		if a.store == nil {
			what = "the first state (beacon) and a lease grant from the broadcaster"
		}
		if ignored != nil {
			a.statusMu.Lock()
			if a.lastSyncErr != nil {
				ignored = a.lastSyncErr
			}
			a.statusMu.Unlock()
			return fmt.Errorf("agent: start: waiting for %s: %w (%w)", what, ctx.Err(), ignored)
		}
		return fmt.Errorf("agent: start: waiting for %s: %w", what, ctx.Err())
	}
}

// awaitLease waits until the lease is valid (the agent is unfenced) or
// ctx ends.
func (a *Agent) awaitLease(ctx context.Context) error {
	t := time.NewTicker(max(a.cfg.HeartbeatInterval/4, time.Millisecond))
	defer t.Stop()
	for a.fenced.Load() {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
	return nil
}

// Stop stops the agent and waits, bounded by ctx, for every goroutine it
// started to return. From the moment Stop is called, Enter refuses with
// ErrStale, so stop the agent once the service has stopped taking work.
// Guards already open (requests in flight at SIGTERM) may finish: until
// the last one exits, the agent keeps its lease (heartbeats go on, state
// messages are applied, and the drainer acknowledges once the guards on an
// older snapshot have exited), so a contract runner waits for them rather
// than drop under them. Then Stop says goodbye, and the store ends the
// lease at once. If ctx ends with guards still open, Stop says no goodbye
// and returns an error: renewing ends, and the lease runs out on its own,
// after which those guards are no longer covered. Stop is safe to call
// twice, and on an agent never started.
func (a *Agent) Stop(ctx context.Context) error {
	a.life.Lock()
	r := a.run
	a.run = nil
	if r != nil {
		a.last = r
	}
	a.life.Unlock()
	if r == nil {
		return nil
	}
	a.setRunning(false)
	a.runPtr.Store(nil)
	// Fenced now, so no guard can open again (see Enter): once none is
	// open, none will be, and the goodbye is true.
	if open, err := a.awaitGuards(ctx); err != nil {
		r.end()
		a.log.Warn().Int64("open_guards", open).Err(err).
			Msg("stopping: the context ended with guards open; no goodbye, the lease runs out on its own")
		return fmt.Errorf("agent: stop: guards still open: %d; no goodbye, the lease runs out on its own: %w", open, err)
	}
	close(r.hush)
	if err := waitGroup(ctx, &r.reporters); err != nil {
		r.end()
		return fmt.Errorf("agent: stop: no goodbye: %w", err)
	}
	if h := a.hooks.beforeGoodbye; h != nil {
		h()
	}
	a.farewell(ctx)
	r.end()
	if err := waitGroup(ctx, &r.wg); err != nil {
		return fmt.Errorf("agent: stop: %w", err)
	}
	a.log.Info().Msg("agent stopped")
	return nil
}

// guardPoll is how often Stop counts the guards still open. Exit stays
// two atomics: it does not tell Stop.
const guardPoll = 10 * time.Millisecond

// awaitGuards waits until no guard is open, the run's goroutines keeping
// the lease meanwhile, or until ctx ends; then it returns the guards
// still open and ctx's error.
func (a *Agent) awaitGuards(ctx context.Context) (int64, error) {
	open := a.openGuards()
	if open == 0 {
		return 0, nil
	}
	a.log.Info().Int64("open_guards", open).Msg("stopping: waiting for the open guards to exit; the lease is kept until then")
	t := time.NewTicker(guardPoll)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			if open = a.openGuards(); open == 0 {
				return 0, nil
			}
			return open, ctx.Err()
		case <-t.C:
			if a.openGuards() == 0 {
				return 0, nil
			}
		}
	}
}

// openGuards counts the guards open on every snapshot still referenced.
func (a *Agent) openGuards() int64 {
	a.pendingMu.Lock()
	defer a.pendingMu.Unlock()
	var n int64
	if cur := a.cur.Load(); cur != nil {
		n += cur.inflight.Load()
	}
	for _, s := range a.pending {
		n += s.inflight.Load()
	}
	return n
}

// halt undoes a Start that failed.
func (a *Agent) halt(r *runState) {
	a.setRunning(false)
	a.runPtr.Store(nil)
	r.end()
	r.wg.Wait()
}

// setRunning opens or closes the lease. Closing it fences at once.
func (a *Agent) setRunning(v bool) {
	a.leaseMu.Lock()
	a.running = v
	if !v {
		a.fenceLocked()
	}
	a.leaseMu.Unlock()
}

func waitGroup(ctx context.Context, wg *sync.WaitGroup) error {
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Stats returns a point-in-time view of the agent.
func (a *Agent) Stats() Stats {
	seq := a.seq.Load()
	st := Stats{
		DrainedEpoch:   a.drained.Load(),
		AppliedEpoch:   a.appliedEpoch(),
		Inflight:       a.inflightOlder(),
		Fenced:         a.fenced.Load(),
		Seq:            seq,
		StatusesSent:   seq - a.seqBase,
		StaleRefusals:  a.staleRefusals.Load(),
		IgnoredStates:  a.ignoredStates.Load(),
		BehindGrants:   a.behindGrants.Load(),
		Resyncs:        a.resyncs.Load(),
		ResyncFailures: a.resyncFailures.Load(),
		DigestConfirms: a.digestConfirms.Load(),
		SignedStates:   a.signedStates.Load(),
		Reconnects:     a.reconnects.Load(),
		Fencings:       a.fencings.Load(),
		StoreID:        a.storeIdentity(),
	}
	st.StatusesIgnored = a.ignoredSyncs.Load()
	st.AckDelays = a.ackDelays.snapshot()
	st.UnconfirmedStatuses = a.unconfirmedStatuses.Load()
	a.leaseMu.Lock()
	if !a.deadline.IsZero() {
		st.LeaseRemaining = time.Until(a.deadline)
	}
	a.leaseMu.Unlock()
	for i := range a.rejected {
		if n := a.rejected[i].Load(); n > 0 {
			if st.RejectedMessages == nil {
				st.RejectedMessages = make(map[string]int64)
			}
			st.RejectedMessages[rejectReasons[i]] = n
		}
	}
	return st
}

// appliedEpoch is the epoch of the current snapshot, -1 before any.
func (a *Agent) appliedEpoch() int64 {
	if s := a.cur.Load(); s != nil {
		return s.epoch
	}
	return -1
}

// inflightOlder counts guards pinned to retired snapshots.
func (a *Agent) inflightOlder() int64 {
	a.pendingMu.Lock()
	defer a.pendingMu.Unlock()
	var n int64
	for _, s := range a.pending {
		n += max(s.inflight.Load(), 0)
	}
	return n
}

// apply swaps in the snapshot of st if st is newer than the one held, and
// wakes the drainer. Duplicates and reordered states change nothing.
func (a *Agent) apply(st *wire.State) bool {
	a.applyMu.Lock()
	defer a.applyMu.Unlock()
	old := a.cur.Load()
	if old != nil && st.Epoch <= old.epoch {
		return false
	}
	s := newSnapshot(st, a.reg, a.drain)
	// The swap and the retirement of the old snapshot happen under
	// pendingMu, the drainer's lock: the drainer can never see the new
	// snapshot without the old one among those it waits for.
	a.pendingMu.Lock()
	a.cur.Store(s)
	a.appliedAt = time.Now()
	if old != nil {
		old.retired.Store(true)
		a.pending = append(pruneDrained(a.pending), old)
	}
	a.pendingMu.Unlock()
	poke(a.drain)
	ev := a.log.Info().Int64("epoch", s.epoch)
	if old != nil {
		ev = ev.Int64("previous_epoch", old.epoch)
	}
	ev.Msg("state applied")
	return true
}

// pruneDrained drops retired snapshots whose guards have all exited. A
// retired snapshot's count can rise again only transiently (an Enter that
// loaded it before the swap backs out without returning a guard), so zero
// seen once after retirement is zero for good.
func pruneDrained(pending []*Snapshot) []*Snapshot {
	kept := pending[:0]
	for _, s := range pending {
		if s.inflight.Load() > 0 {
			kept = append(kept, s)
		}
	}
	clear(pending[len(kept):])
	return kept
}

// drainLoop is the drainer: woken by every swap and by the last guard to
// exit a retired snapshot, it runs OnChange for a new snapshot, then, once
// no guard is pinned to any older snapshot, sets drained_epoch and sends
// the acknowledgement at once.
func (a *Agent) drainLoop(r *runState) {
	for {
		select {
		case <-r.ctx.Done():
			return
		case <-r.hush:
			return
		case <-a.drain:
		}
		a.checkDrained(r.ctx)
	}
}

func (a *Agent) checkDrained(ctx context.Context) {
	for {
		cur := a.cur.Load()
		if cur == nil {
			return
		}
		a.pendingMu.Lock()
		old := a.notified
		a.notified = cur
		a.pendingMu.Unlock()
		if old != nil && old != cur && a.cfg.OnChange != nil {
			a.callOnChange(old, cur)
		}

		a.pendingMu.Lock()
		if a.cur.Load() != cur {
			// Swapped again meanwhile: OnChange sees the newer one first.
			a.pendingMu.Unlock()
			continue
		}
		a.pending = pruneDrained(a.pending)
		acked := len(a.pending) == 0 && cur.epoch > a.drained.Load()
		arrived := a.appliedAt // cur's: it is still the current snapshot
		if acked {
			a.drained.Store(cur.epoch)
		}
		a.pendingMu.Unlock()
		if acked {
			a.log.Debug().Int64("drained_epoch", cur.epoch).Msg("drained; acknowledging")
			a.report(ctx, reasonAck)
			a.ackDelays.observe(time.Since(arrived))
		}
		return
	}
}

func (a *Agent) callOnChange(old, cur *Snapshot) {
	defer func() {
		if p := recover(); p != nil {
			a.log.Error().Interface("panic", p).Int64("epoch", cur.epoch).Msg("Config.OnChange panicked")
		}
	}()
	a.cfg.OnChange(old, cur)
}

// poke wakes whoever waits on a 1-buffered channel, without blocking.
func poke(c chan<- struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}
