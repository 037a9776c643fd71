package soak

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/cmd/phasecast/cli"
	"github.com/phasecast/phasecast/internal/faultproxy"
	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/retry"
	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/schema"
)

// The fleet and its intervals: short leases, so that a frozen or
// partitioned agent is given up on within seconds; sized for two shared
// cores.
const (
	numAgents     = 12
	numItemTables = 2
	heartbeat     = 500 * time.Millisecond
	leaseMargin   = 500 * time.Millisecond
	initialLease  = 3 * time.Second
	confirmIvl    = 50 * time.Millisecond
	workerPause   = 60 * time.Millisecond
	workerHold    = 80 * time.Millisecond
	startLease    = 3 * time.Second
)

// leaseChoices are the --lease values a restarted broadcaster draws from.
var leaseChoices = []time.Duration{2 * time.Second, 3 * time.Second, 4 * time.Second}

// release is one release of the soak's series. It removes one column of
// an item table, or a scratch table whole.
type release struct {
	name   string
	table  string // schema-qualified, as manifests and agents spell it
	column string // empty: the table goes
}

func (r release) yaml() string {
	if r.column == "" {
		return fmt.Sprintf("release: %s\nremoved:\n  - table: %s\n", r.name, r.table)
	}
	return fmt.Sprintf("release: %s\nremoved:\n  - table: %s\n    columns: [%s]\n", r.name, r.table, r.column)
}

// names reports whether a unit of work on table with cols (comma-joined)
// names what r removes.
func (r release) names(table, cols string) bool {
	if table != r.table {
		return false
	}
	return r.column == "" || strings.Contains(","+cols+",", ","+r.column+",")
}

// world is one soak run: a store and an application schema of its own,
// an AMQP prefix of its own, the services and broadcasters as processes,
// and what the run recorded.
type world struct {
	t      *testing.T
	ctx    context.Context
	seed   uint64
	store  *schema.Store
	db     *sqlx.DB
	prefix string
	app    string
	dir    string
	start  time.Time

	releases   []release
	tables     map[string][]string
	itemTables []string

	services []*service
	bcasts   []*bcast

	mu        sync.Mutex
	procs     []*proc // every service process ever started, for the checker
	faults    map[string]int
	contracts []contractRecord
	findings  []finding // found while running (commands accepted out of order)
	stalls    int
}

// contractRecord is one contract run that completed a release: what the
// runner counted and when it dropped, on the runner's wall clock.
type contractRecord struct {
	rel      release
	epoch    int64
	ackedAt  time.Time
	ddlStart time.Time
	ddlEnd   time.Time
	// The DROP committed after commitAfter and before commitBefore: the
	// DDL window, narrowed by watching the catalog from outside.
	commitAfter  time.Time
	commitBefore time.Time
	acked        []string
}

func newWorld(t *testing.T, seed uint64, duration time.Duration) *world {
	t.Helper()
	store := testenv.Store(t)
	// The database's connections are shared with every other test on
	// the machine: the soak keeps to about 50 in all.
	store.DB().SetMaxOpenConns(4)
	store.DB().SetMaxIdleConns(1)
	w := &world{
		t: t, ctx: context.Background(), seed: seed, store: store, db: store.DB(),
		prefix: testenv.Prefix(t), app: testenv.Schema(t, store.DB(), "soak"), dir: t.TempDir(),
		tables: map[string][]string{}, faults: map[string]int{},
	}
	// About one release a second gets through; a run that uses them all
	// up simply ends its releases early.
	n := int(duration/time.Second) + 10
	for i := range numItemTables {
		name := fmt.Sprintf("%s.items_%d", w.app, i)
		w.itemTables = append(w.itemTables, name)
		w.tables[name] = []string{"id", "keep"}
	}
	for k := range n {
		rel := release{name: fmt.Sprintf("R%04d", k+1)}
		if k%5 == 4 {
			rel.table = fmt.Sprintf("%s.scratch_%04d", w.app, k+1)
			w.tables[rel.table] = []string{"id", "a", "b"}
		} else {
			rel.table, rel.column = w.itemTables[k%numItemTables], fmt.Sprintf("c%04d", k+1)
			w.tables[rel.table] = append(w.tables[rel.table], rel.column)
		}
		w.releases = append(w.releases, rel)
	}
	for name, cols := range w.tables {
		defs := []string{"id bigserial PRIMARY KEY"}
		for _, c := range cols[1:] {
			defs = append(defs, pq.QuoteIdentifier(c)+" text")
		}
		w.exec(`CREATE TABLE ` + schema.QuoteTable(name) + ` (` + strings.Join(defs, ", ") + `)`)
		w.exec(`INSERT INTO ` + schema.QuoteTable(name) + ` (` + pq.QuoteIdentifier(cols[1]) + `) SELECT 'row-' || i FROM generate_series(1, 5) AS i`)
	}
	for _, rel := range w.releases {
		m, err := schema.ParseManifest(rel.name+".yaml", []byte(rel.yaml()))
		require.NoError(t, err)
		_, err = store.ApplyRelease(w.ctx, m, "soak")
		require.NoError(t, err)
	}
	return w
}

func (w *world) exec(stmt string, args ...any) {
	w.t.Helper()
	_, err := w.db.ExecContext(w.ctx, stmt, args...)
	require.NoError(w.t, err, stmt)
}

// since is the run's clock for log lines.
func (w *world) since() string { return fmt.Sprintf("+%07.3fs", time.Since(w.start).Seconds()) }

func (w *world) logf(format string, args ...any) {
	w.t.Helper()
	w.t.Logf("%s "+format, append([]any{w.since()}, args...)...)
}

// releaseNames lists the series, for the agents' Config.Releases.
func (w *world) releaseNames() []string {
	out := make([]string, len(w.releases))
	for i, r := range w.releases {
		out[i] = r.name
	}
	return out
}

// cli runs a phasecast command in-process against the run's store and
// broker, as an operator's script would.
func (w *world) cli(ctx context.Context, args ...string) (code int, stdout, stderr string) {
	var out, errOut bytes.Buffer
	full := append([]string{args[0],
		"--database-url", testenv.DatabaseURL(), "--amqp-url", testenv.AMQPURL(),
		"--schema", w.store.Schema(), "--exchange-prefix", w.prefix, "--log-level", "warn"}, args[1:]...)
	code = cli.Main(ctx, full, &out, &errOut)
	return code, out.String(), errOut.String()
}

// phaseOf reads a release's phase from the store.
func (w *world) phaseOf(name string) phase.Phase {
	w.t.Helper()
	rel, err := w.store.Release(w.ctx, name)
	require.NoError(w.t, err)
	return rel.Phase
}

// present reports whether what rel removes is still in the database.
func (w *world) present(rel release) bool {
	w.t.Helper()
	ok, err := w.presentErr(w.ctx, rel)
	require.NoError(w.t, err)
	return ok
}

func (w *world) presentErr(ctx context.Context, rel release) (bool, error) {
	var ok bool
	if rel.column == "" {
		err := w.db.GetContext(ctx, &ok, `SELECT to_regclass($1) IS NOT NULL`, schema.QuoteTable(rel.table))
		return ok, err
	}
	err := w.db.GetContext(ctx, &ok, `SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass($1) AND attname = $2 AND attnum > 0 AND NOT attisdropped)`,
		schema.QuoteTable(rel.table), rel.column)
	return ok, err
}

// dropWatch brackets the moment a DROP commits, seen from outside the
// runner: a catalog read that still sees the column was sent before the
// commit, one that no longer sees it was answered after it.
type dropWatch struct {
	lastPresent time.Time // when the last read that saw it was sent
	firstGone   time.Time // when the first read that did not see it was answered
	stop        context.CancelFunc
	done        chan struct{}
}

func (w *world) watchDrop(rel release) *dropWatch {
	ctx, cancel := context.WithCancel(w.ctx)
	d := &dropWatch{stop: cancel, done: make(chan struct{})}
	go func() {
		defer close(d.done)
		for {
			sent := time.Now()
			ok, err := w.presentErr(ctx, rel)
			switch {
			case err != nil && ctx.Err() != nil:
				return
			case err == nil && ok:
				d.lastPresent = sent
			case err == nil:
				d.firstGone = time.Now()
				return
			}
			if retry.Sleep(ctx, 5*time.Millisecond) != nil {
				return
			}
		}
	}()
	return d
}

// bounds stops the watch and narrows the DDL window [start, end] to the
// commit.
func (d *dropWatch) bounds(start, end time.Time) (after, before time.Time) {
	d.stop()
	<-d.done
	after, before = start, end
	if d.lastPresent.After(after) {
		after = d.lastPresent
	}
	if !d.firstGone.IsZero() && d.firstGone.Before(before) {
		before = d.firstGone
	}
	return after, before
}

func (w *world) countFault(kind string) {
	w.mu.Lock()
	w.faults[kind]++
	w.mu.Unlock()
}

func (w *world) find(f finding) {
	w.mu.Lock()
	w.findings = append(w.findings, f)
	w.mu.Unlock()
	w.logf("VIOLATION %s: %s", f.kind, f.detail)
}

// --- processes ---

// binaries builds phasecast and the soak service once per test binary.
func binaries(t *testing.T) (phasecast, service string) {
	t.Helper()
	paths := testenv.Build(t, "github.com/phasecast/phasecast/cmd/phasecast",
		"github.com/phasecast/phasecast/integration/soak/cmd/soakservice")
	return paths[0], paths[1]
}

// proc is one child process, with what the checker needs to know of
// when it could have been running: started before exec (Started), killed
// just before SIGKILL was sent, exited when Wait returned (Exit).
type proc struct {
	*testenv.Proc
	agent   string // the agent ID, for service processes
	history string // the history file, for service processes

	mu     sync.Mutex
	killed time.Time
	frozen []freeze // SIGSTOP to SIGCONT
}

func (w *world) startProc(name, path string, args ...string) (*proc, error) {
	p, err := testenv.StartProc(name, filepath.Join(w.dir, name+".log"), path, args...)
	if err != nil {
		return nil, err
	}
	return &proc{Proc: p}, nil
}

// signal sends sig, first noting the kill or the freeze it begins or
// ends.
func (p *proc) signal(sig syscall.Signal) {
	if !p.Alive() {
		return
	}
	p.mu.Lock()
	switch sig {
	case syscall.SIGKILL:
		if p.killed.IsZero() {
			p.killed = time.Now()
		}
	case syscall.SIGSTOP:
		// Taken before the signal is sent: whatever was open now was
		// open when the process froze.
		p.frozen = append(p.frozen, freeze{from: time.Now().UnixNano()})
	case syscall.SIGCONT:
		if n := len(p.frozen); n > 0 && p.frozen[n-1].to == 0 {
			p.frozen[n-1].to = time.Now().UnixNano()
		}
	}
	p.mu.Unlock()
	p.Signal(sig)
}

// freeze is one SIGSTOP of a process, in Unix nanoseconds; to is 0 while
// it lasts.
type freeze struct{ from, to int64 }

// frozenWhile reports whether the process was frozen at some moment after
// begin and before end: a unit of work open across that moment was
// frozen inside its guard.
func (p *proc) frozenWhile(begin, end int64) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, f := range p.frozen {
		if f.from > begin && f.from < end {
			return true
		}
	}
	return false
}

// end is the latest moment the process is known to have been running.
func (p *proc) end() time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.killed.IsZero() {
		return p.killed
	}
	exited, _ := p.Exit()
	return exited
}

// terminate stops a process gracefully, and kills it if it has not exited
// within limit.
func (p *proc) terminate(limit time.Duration) {
	p.signal(syscall.SIGCONT)
	p.signal(syscall.SIGTERM)
	if !p.Wait(limit) {
		p.signal(syscall.SIGKILL)
		<-p.Done()
	}
}

// target is something one fault at a time may hold.
type target struct {
	mu   sync.Mutex
	busy bool
}

// claim takes the target for a fault; false if another fault has it.
func (t *target) claim() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.busy {
		return false
	}
	t.busy = true
	return true
}

func (t *target) release() {
	t.mu.Lock()
	t.busy = false
	t.mu.Unlock()
}

// service is one agent ID of the fleet: its proxies stay for the whole
// run, its process is restarted after a kill.
type service struct {
	id      string
	hasDB   bool
	workers int
	amqp    *faultproxy.Proxy
	pg      *faultproxy.Proxy // nil without a store handle

	target
	mu    sync.Mutex
	cur   *proc
	spawn int
}

func (s *service) current() *proc {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cur
}

// claim marks the service as the target of a fault; false if another
// fault has it or its process is not running.
func (s *service) claim() bool {
	if p := s.current(); p == nil || !p.Alive() {
		return false
	}
	return s.target.claim()
}

func (w *world) newServices() {
	pgUp, err := faultproxy.HostPort(testenv.DatabaseURL())
	require.NoError(w.t, err)
	amqpUp, err := faultproxy.HostPort(testenv.AMQPURL())
	require.NoError(w.t, err)
	for i := range numAgents {
		s := &service{id: fmt.Sprintf("soak-%02d", i), hasDB: i%2 == 0, workers: 1 + i%3%2, amqp: faultproxy.Start(w.t, amqpUp)}
		if s.hasDB {
			s.pg = faultproxy.Start(w.t, pgUp)
		}
		w.services = append(w.services, s)
	}
}

// startService starts a process under s's ID: the service's own (main)
// or a second one beside it.
func (w *world) startService(s *service, main bool) (*proc, error) {
	s.mu.Lock()
	s.spawn++
	n := s.spawn
	s.mu.Unlock()
	w.mu.Lock()
	procSeed := w.seed*1000 + uint64(len(w.procs))
	w.mu.Unlock()
	name := fmt.Sprintf("%s.%d", s.id, n)
	cfg := ServiceConfig{
		ID: s.id, Service: map[bool]string{true: "svc-db", false: "svc-nodb"}[s.hasDB],
		WorkURL: testenv.DatabaseURL(), AMQPURL: s.amqp.URL(testenv.AMQPURL()),
		Schema: w.store.Schema(), Prefix: w.prefix, Releases: w.releaseNames(), Tables: w.tables, ItemTables: w.itemTables,
		Workers: s.workers, Pause: workerPause, Hold: workerHold, Seed: procSeed,
		History:           filepath.Join(w.dir, name+".jsonl"),
		HeartbeatInterval: heartbeat, LeaseMargin: leaseMargin, InitialLease: initialLease, ConfirmInterval: confirmIvl,
	}
	if s.hasDB {
		cfg.StoreURL = s.pg.URL(testenv.DatabaseURL())
	}
	raw, err := json.Marshal(cfg)
	if err != nil {
		return nil, err
	}
	cfgPath := filepath.Join(w.dir, name+".json")
	if err := os.WriteFile(cfgPath, raw, 0o600); err != nil {
		return nil, err
	}
	_, bin := binaries(w.t)
	p, err := w.startProc(name, bin, "-config", cfgPath)
	if err != nil {
		return nil, err
	}
	p.agent, p.history = s.id, cfg.History
	w.mu.Lock()
	w.procs = append(w.procs, p)
	w.mu.Unlock()
	if main {
		s.mu.Lock()
		s.cur = p
		s.mu.Unlock()
	}
	return p, nil
}

// bcast is one broadcaster slot: a 'phasecast broadcast' process that
// reaches the broker through a proxy of its own.
type bcast struct {
	target
	slot  int
	amqp  *faultproxy.Proxy
	mu    sync.Mutex
	cur   *proc
	id    string
	lease time.Duration
	spawn int
}

func (b *bcast) current() (*proc, string, time.Duration) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.cur, b.id, b.lease
}

func (w *world) newBroadcasters() {
	amqpUp, err := faultproxy.HostPort(testenv.AMQPURL())
	require.NoError(w.t, err)
	for i := range 2 {
		w.bcasts = append(w.bcasts, &bcast{slot: i, amqp: faultproxy.Start(w.t, amqpUp), lease: startLease})
	}
}

// startBroadcaster starts slot b's broadcaster with the given lease.
func (w *world) startBroadcaster(b *bcast, lease time.Duration) error {
	bin, _ := binaries(w.t)
	b.mu.Lock()
	b.spawn++
	id := fmt.Sprintf("bc%d-%d-%s", b.slot, b.spawn, w.prefix)
	name := fmt.Sprintf("bc%d.%d", b.slot, b.spawn)
	b.mu.Unlock()
	p, err := w.startProc(name, bin, "broadcast",
		"--database-url", testenv.DatabaseURL(), "--amqp-url", b.amqp.URL(testenv.AMQPURL()),
		"--schema", w.store.Schema(), "--exchange-prefix", w.prefix, "--id", id,
		"--lease", lease.String(), "--beacon-interval", "1s", "--liveness-interval", "250ms", "--poll-interval", "250ms",
		"--log-format", "json", "--log-level", "info", "--insecure")
	if err != nil {
		return err
	}
	b.mu.Lock()
	b.cur, b.id, b.lease = p, id, lease
	b.mu.Unlock()
	return nil
}

// maxLease is the longest lease a running broadcaster grants.
func (w *world) maxLease() time.Duration {
	var m time.Duration
	for _, b := range w.bcasts {
		_, _, l := b.current()
		m = max(m, l)
	}
	return m
}

// leader returns the slot whose broadcaster leads now, if any.
func (w *world) leader() *bcast {
	rep, err := w.store.Report(w.ctx, 0)
	if err != nil {
		return nil
	}
	for _, row := range rep.Broadcasters {
		if !row.Leader || time.Since(row.LastSeen) > 2*time.Second {
			continue
		}
		for _, b := range w.bcasts {
			if p, id, _ := b.current(); id == row.ID && p != nil && p.Alive() {
				return b
			}
		}
	}
	return nil
}

// waitFor polls cond until it holds or limit passes.
func waitFor(limit time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
	return true
}
