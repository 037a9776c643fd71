package demo

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"
	"github.com/rs/zerolog"

	"github.com/phasecast/phasecast/cmd/phasecast/fleet"
	"github.com/phasecast/phasecast/cmd/phasecast/internal/latency"
	"github.com/phasecast/phasecast/examples/novalike"
	"github.com/phasecast/phasecast/internal/pgadmin"
	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/schema"
)

// Options configure a demo run.
type Options struct {
	Agents      int // service instances; defaults to 20
	Workers     int // workers per instance; defaults to 2
	DatabaseURL string
	AMQPURL     string
	Out         io.Writer      // the timelines, summary and comparison
	Logger      zerolog.Logger // component logs; defaults to none
	// Name is the suffix of the demo's schemas and AMQP names. Defaults to
	// a random one. The run without the gate adds UngatedSuffix to it.
	Name string
	// Python adds that many instances of the Python example service
	// (python/examples/novalike.py, each a process of its own with the
	// Python agent) to each run's fleet. They need Debian's /usr/bin/python3
	// and its packages (fleet.PythonModules): Run refuses at once, saying
	// what to install, without them.
	Python int
	// PythonDir is the repository's python/ directory. Defaults to the
	// one found from the working directory up (fleet.PythonDir).
	PythonDir string
}

// UngatedSuffix ends the names of the run without the gate, so that its
// schemas and AMQP names are apart from the phasecast run's.
const UngatedSuffix = "_nogate"

// Report is the demo's outcome. Its top-level fields describe the run
// with phasecast, the one the demo's success depends on.
type Report struct {
	// Agents, Queries, Failed and Refused count the whole fleet, Go and
	// Python; Python the Python instances alone.
	Agents      int                    `json:"agents"`
	Queries     int64                  `json:"queries"`
	Failed      int64                  `json:"failed"`
	Refused     int64                  `json:"refused"`
	FirstError  string                 `json:"first_error,omitempty"`
	AckLatency  latency.Summary        `json:"ack_latency"`
	Dropped     []string               `json:"dropped"`
	ColumnsLeft []string               `json:"columns_left"`
	Contract    *schema.ContractResult `json:"contract"`
	Python      Python                 `json:"python"`
	Ungated     Ungated                `json:"ungated"`
}

// Python is what the Python instances of a run counted.
type Python struct {
	Agents  int   `json:"agents"`
	Queries int64 `json:"queries"`
	Failed  int64 `json:"failed"`
	Refused int64 `json:"refused"`
}

// Ungated is what the same release saw without the gate: flipped to
// contract and the columns dropped at once, as a hurried script does.
// It is reported, never judged: the demo's outcome does not depend on it.
type Ungated struct {
	Queries    int64  `json:"queries"`
	Failed     int64  `json:"failed"`
	Refused    int64  `json:"refused"`
	FirstError string `json:"first_error,omitempty"`
	Python     Python `json:"python"`
	// DropAfter is from the contract flip's commit to the DROP's start.
	DropAfter time.Duration `json:"drop_after_ns"`
	// AckedAtDrop counts the agents whose acknowledgement was recorded
	// when the DROP committed.
	AckedAtDrop int `json:"acked_at_drop"`
	// Error is why the run could not be completed, if it could not.
	Error string `json:"error,omitempty"`
}

// ErrFailed means the demo ran but its promise did not hold.
var ErrFailed = errors.New("demo failed")

// removedColumns are what release L removes from the instances table.
var removedColumns = []string{"name", "display_name"}

// timeline prints events with their offset from the start.
type timeline struct {
	out   io.Writer
	start time.Time
}

func (t *timeline) at(when time.Time, format string, args ...any) {
	fmt.Fprintf(t.out, "  %9.3fs  %s\n", when.Sub(t.start).Seconds(), fmt.Sprintf(format, args...))
}

func (t *timeline) now(format string, args ...any) { t.at(time.Now(), format, args...) }

// Run runs the demo: the release once without the gate, then once with
// phasecast, each on a fleet, store and table of its own; it prints both
// side by side. Only the phasecast run decides the outcome.
func Run(ctx context.Context, opts Options) (*Report, error) {
	if opts.Agents <= 0 {
		opts.Agents = 20
	}
	if opts.Workers <= 0 {
		opts.Workers = 2
	}
	if opts.Name == "" {
		opts.Name = randomName()
	}
	if opts.Python > 0 {
		if err := fleet.CheckPython(ctx, fleet.PythonModules); err != nil {
			return nil, fmt.Errorf("--python: %w", err)
		}
		if opts.PythonDir == "" {
			dir, err := fleet.PythonDir(".")
			if err != nil {
				return nil, fmt.Errorf("--python: %w", err)
			}
			opts.PythonDir = dir
		}
	}
	out := opts.Out
	fmt.Fprintf(out, "phasecast demo: %d services × %d workers, the same release run twice\n", opts.Agents, opts.Workers)
	if opts.Python > 0 {
		fmt.Fprintf(out, "  and %d Python services × %d workers (python/examples/novalike.py, each a process with the Python agent)\n", opts.Python, opts.Workers)
	}

	fmt.Fprintf(out, "\n1. without the gate: flip to contract, then DROP at once, as a hurried script does\n")
	ungated := runUngated(ctx, opts)
	if err := ctx.Err(); err != nil {
		return nil, err
	}

	fmt.Fprintf(out, "\n2. with phasecast: flip to contract, DROP only once every agent acknowledged\n")
	p := newPass(opts, opts.Name, true)
	defer p.cleanup()
	o, err := p.run(ctx)
	if err != nil {
		return nil, err
	}
	failures := o.totals.Failures
	if o.stopErr != nil {
		failures = append(failures, o.stopErr)
	}
	rep := &Report{
		Agents: o.agents, Queries: o.totals.Queries, Failed: o.totals.Failed, Refused: o.totals.Refused,
		FirstError: firstError(failures), AckLatency: latency.Summarize(o.ackTimes),
		Dropped: o.contract.Dropped, ColumnsLeft: o.columnsLeft, Contract: o.contract, Python: o.python, Ungated: ungated,
	}

	fmt.Fprintf(out, "\nsummary (with phasecast)\n")
	fmt.Fprintf(out, "  queries run        %d\n", rep.Queries)
	fmt.Fprintf(out, "  queries failed     %d\n", rep.Failed)
	if rep.Python.Agents > 0 {
		fmt.Fprintf(out, "  of which Python    %d queries run, %d failed (%d services)\n", rep.Python.Queries, rep.Python.Failed, rep.Python.Agents)
	}
	fmt.Fprintf(out, "  ack latency        p50 %s, p99 %s (flip commit → ack recorded, %d agents)\n", ms(rep.AckLatency.P50), ms(rep.AckLatency.P99), rep.AckLatency.N)
	fmt.Fprintf(out, "  columns dropped    %s\n", strings.Join(rep.Dropped, ", "))
	fmt.Fprintf(out, "  columns remaining  %s\n", strings.Join(rep.ColumnsLeft, ", "))
	for _, f := range failures {
		fmt.Fprintf(out, "  failure: %v\n", f)
	}
	printComparison(out, rep, o)

	if rep.Failed > 0 || len(failures) > 0 || rep.AckLatency.N != rep.Agents {
		return rep, fmt.Errorf("%w: %d queries failed, %d of %d agents acknowledged", ErrFailed, rep.Failed, rep.AckLatency.N, rep.Agents)
	}
	for _, c := range rep.ColumnsLeft {
		if slices.Contains(removedColumns, c) {
			return rep, fmt.Errorf("%w: column %q was not dropped", ErrFailed, c)
		}
	}
	fmt.Fprintf(out, "\nok: every agent acknowledged before the drop, and not one query failed\n")
	return rep, nil
}

// runUngated runs the release without the gate and cleans up after it.
// What it could not do is reported in the result, not returned: the
// demo goes on to the phasecast run either way.
func runUngated(ctx context.Context, opts Options) Ungated {
	p := newPass(opts, opts.Name+UngatedSuffix, false)
	defer p.cleanup()
	o, err := p.run(ctx)
	if err != nil {
		fmt.Fprintf(opts.Out, "  could not complete the run without the gate: %v\n", err)
		return Ungated{Error: err.Error()}
	}
	failures := o.totals.Failures
	if o.stopErr != nil {
		failures = append(failures, o.stopErr)
	}
	return Ungated{
		Queries: o.totals.Queries, Failed: o.totals.Failed, Refused: o.totals.Refused,
		FirstError: firstError(failures), Python: o.python, DropAfter: o.dropAfter, AckedAtDrop: o.ackedAtDrop,
	}
}

// printComparison prints the two runs side by side.
func printComparison(out io.Writer, rep *Report, gated *outcome) {
	u := rep.Ungated
	fmt.Fprintf(out, "\nside by side (the same release, each run on %d services of its own)\n", rep.Agents)
	w := tabwriter.NewWriter(out, 0, 0, 3, ' ', 0)
	fmt.Fprintf(w, "  \twithout the gate\twith phasecast\n")
	if u.Error != "" {
		fmt.Fprintf(w, "  run\tnot completed: %s\tcompleted\n", oneLine(u.Error))
	}
	fmt.Fprintf(w, "  queries run\t%d\t%d\n", u.Queries, rep.Queries)
	fmt.Fprintf(w, "  queries failed\t%d\t%d\n", u.Failed, rep.Failed)
	if rep.Python.Agents > 0 {
		fmt.Fprintf(w, "  of which Python\t%d run, %d failed\t%d run, %d failed\n", u.Python.Queries, u.Python.Failed, rep.Python.Queries, rep.Python.Failed)
	}
	fmt.Fprintf(w, "  DROP started\t+%s after the flip\t+%s after the flip\n", ms(u.DropAfter), ms(gated.dropAfter))
	fmt.Fprintf(w, "  acknowledged by then\t%d/%d agents\t%d/%d agents\n", u.AckedAtDrop, rep.Agents, rep.AckLatency.N, rep.Agents)
	fmt.Fprintf(w, "  first error\t%s\t%s\n", orNone(u.FirstError), orNone(rep.FirstError))
	_ = w.Flush()
}

// pass is one run of release L on a fleet, store and table of its own.
// Gated, it contracts through the runner; ungated, it drops the columns
// right after the flip.
type pass struct {
	opts                   Options
	gated                  bool
	tl                     *timeline
	storeSchema, appSchema string
	appTable               string // "demo_x.instances"
	prefix                 string
	db                     *sqlx.DB
	store                  *schema.Store
	cleanups               []func()
}

// outcome is what a pass saw.
type outcome struct {
	agents      int
	totals      fleet.Totals // Go and Python
	python      Python
	stopErr     error
	ackTimes    []time.Duration // flip commit → each ack recorded (gated)
	dropAfter   time.Duration   // flip commit → DROP start
	ackedAtDrop int             // acks recorded when the DROP committed (ungated)
	contract    *schema.ContractResult
	columnsLeft []string
}

func newPass(opts Options, name string, gated bool) *pass {
	p := &pass{opts: opts, gated: gated, tl: &timeline{out: opts.Out, start: time.Now()}}
	p.storeSchema, p.appSchema, p.prefix = "phasecast_demo_"+name, "demo_"+name, "phasecast_demo_"+name
	p.appTable = p.appSchema + ".instances"
	return p
}

func (d *pass) defers(f func()) { d.cleanups = append(d.cleanups, f) }

func (d *pass) cleanup() {
	for i := len(d.cleanups) - 1; i >= 0; i-- {
		d.cleanups[i]()
	}
	d.cleanups = nil
}

func (d *pass) run(ctx context.Context) (*outcome, error) {
	o := d.opts
	fmt.Fprintf(o.Out, "   store schema %s, table %s\n\n", d.storeSchema, d.appTable)

	store, err := schema.Open(ctx, o.DatabaseURL, d.storeSchema)
	if err != nil {
		return nil, err
	}
	d.store, d.db = store, store.DB()
	d.defers(func() { store.Close() })
	d.defers(func() { _ = pgadmin.DropSchemas(context.Background(), d.db, d.storeSchema, d.appSchema) })
	if _, err := store.Migrate(ctx); err != nil {
		return nil, err
	}
	d.defers((&fleet.Env{AMQPURL: o.AMQPURL, Prefix: d.prefix}).DeleteAMQP)
	if err := d.createAppTable(ctx); err != nil {
		return nil, err
	}
	d.tl.now("store migrated; %s created with 1000 rows", d.appTable)

	env := &fleet.Env{Store: store, DatabaseURL: o.DatabaseURL, AMQPURL: o.AMQPURL, Prefix: d.prefix, Logger: o.Logger}
	if err := env.Secure(ctx); err != nil {
		return nil, err
	}
	var acks fleet.AckClock
	bcfg := env.BroadcasterConfig()
	bcfg.OnRecorded = acks.OnRecorded
	b, err := env.StartBroadcaster(ctx, bcfg, true)
	if err != nil {
		return nil, err
	}
	d.defers(func() { _ = b.Stop(context.Background()) })
	d.tl.now("broadcaster started and leading")

	m, err := schema.ParseManifest("demo L.yaml", []byte(manifest(d.appTable)))
	if err != nil {
		return nil, err
	}
	applied, err := store.ApplyRelease(ctx, m, "demo")
	if err != nil {
		return nil, err
	}
	d.tl.now("release L applied: expand ran (ADD COLUMN common_name), epoch %d", applied.Epoch)

	startCtx, cancelStart := context.WithTimeout(ctx, 30*time.Second)
	services, err := fleet.StartServices(startCtx, o.Agents, func(i int) novalike.Config {
		return env.ServiceConfig(fmt.Sprintf("nova-api-%02d", i), d.appTable, o.Workers)
	})
	cancelStart()
	if err != nil {
		return nil, err
	}
	d.defers(func() { _, _ = services.Stop(context.Background()) })
	d.tl.now("%d services started (code built for L), %d workers running", len(services.List), len(services.List)*o.Workers)
	py := &fleet.PythonServices{}
	if o.Python > 0 {
		startCtx, cancelStart := context.WithTimeout(ctx, 2*time.Minute)
		py, err = env.StartPythonServices(startCtx, o.Python, func(i int) fleet.PythonConfig {
			return fleet.PythonConfig{Dir: o.PythonDir, Service: fmt.Sprintf("nova-py-%02d", i), Table: d.appTable, Workers: o.Workers}
		})
		cancelStart()
		if err != nil {
			return nil, err
		}
		d.defers(func() {
			// Bounded: a process that does not exit is killed.
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			_, _ = py.Stop(ctx)
		})
		d.tl.now("%d Python services started (code built for L), %d workers running", len(py.List), len(py.List)*o.Workers)
	}
	time.Sleep(300 * time.Millisecond) // let the workers get going under the old phase

	if _, err := d.flip(ctx, phase.Migrate); err != nil {
		return nil, err
	}
	res, err := d.db.ExecContext(ctx, fmt.Sprintf(`UPDATE %s SET common_name = coalesce(name, display_name) WHERE common_name IS NULL`, schema.QuoteTable(d.appTable)))
	if err != nil {
		return nil, err
	}
	n, _ := res.RowsAffected()
	d.tl.now("backfill: common_name set on %d rows", n)

	// Armed before the flip for the epoch it will take: the demo is the
	// store's only writer, and the flip's epoch is checked below.
	before, err := store.Epoch(ctx)
	if err != nil {
		return nil, err
	}
	ids := make(map[string]bool, len(services.List))
	for _, svc := range services.List {
		ids[svc.Agent().ID()] = true
	}
	for _, id := range py.IDs() {
		ids[id] = true
	}
	ackWait := acks.Expect(before+1, ids)
	flipped, err := store.Flip(ctx, "L", phase.Contract, schema.FlipOptions{Actor: "demo", Check: store.ContractCheck(schema.ContractCheckOptions{})})
	committed := time.Now()
	if err != nil {
		ackWait.Cancel()
		return nil, err
	}
	if flipped.Epoch != before+1 {
		ackWait.Cancel()
		return nil, fmt.Errorf("another change ran during the demo: the contract flip took epoch %d, not %d", flipped.Epoch, before+1)
	}
	out := &outcome{agents: len(ids)}
	if d.gated {
		err = d.contract(ctx, committed, flipped.Epoch, ackWait, out)
	} else {
		err = d.dropAtOnce(ctx, committed, flipped.Epoch, ackWait, out)
	}
	if err != nil {
		return nil, err
	}

	time.Sleep(500 * time.Millisecond) // traffic after the drop counts too
	stopCtx, cancelStop := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	out.totals, out.stopErr = services.Stop(stopCtx)
	pyTotals, pyErr := py.Stop(stopCtx)
	cancelStop()
	out.python = Python{Agents: len(py.List), Queries: pyTotals.Queries, Failed: pyTotals.Failed, Refused: pyTotals.Refused}
	out.totals.Queries += pyTotals.Queries
	out.totals.Failed += pyTotals.Failed
	out.totals.Refused += pyTotals.Refused
	out.totals.Failures = append(out.totals.Failures, pyTotals.Failures...)
	out.stopErr = errors.Join(out.stopErr, pyErr)
	d.tl.now("services stopped")
	if d.gated {
		if out.columnsLeft, err = d.remainingColumns(ctx); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// contract is phasecast's way: the runner waits for every live agent's
// acknowledgement, then drops.
func (d *pass) contract(ctx context.Context, committed time.Time, epoch int64, ackWait *fleet.AckWait, out *outcome) error {
	d.tl.at(committed, "flip L contract committed, epoch %d", epoch)
	d.opts.Logger.Debug().Int64("epoch", epoch).Msg("contract flip committed")
	contract, err := d.store.Contract(ctx, "L", schema.ContractOptions{Timeout: 30 * time.Second, PollInterval: 10 * time.Millisecond, Actor: "demo", LeaderWithin: 5 * time.Second})
	// The runner has seen every ack in the store, so every commit has
	// been reported: Wait returns at once.
	ackTimes := latency.Since(ackWait.Wait(ctx, time.Second), committed)
	slices.Sort(ackTimes)
	if err != nil {
		return err
	}
	if len(ackTimes) > 0 {
		d.tl.at(committed.Add(ackTimes[0]), "first acknowledgement recorded (+%s)", ms(ackTimes[0]))
		d.tl.at(committed.Add(ackTimes[len(ackTimes)-1]), "last acknowledgement recorded (+%s): %d/%d agents", ms(ackTimes[len(ackTimes)-1]), len(ackTimes), out.agents)
	}
	d.tl.at(contract.DDLStart, "contracting: DDL start (lock_timeout %s)", schema.DefaultLockTimeout)
	d.tl.at(contract.DDLEnd, "DDL end: dropped %s (%d attempt(s))", strings.Join(contract.Dropped, ", "), contract.Attempts)
	d.tl.now("release L complete")
	out.ackTimes, out.contract, out.dropAfter = ackTimes, contract, contract.DDLStart.Sub(committed)
	return nil
}

// dropAtOnce is the hurried script's way: the DROP is the next statement
// after the flip, so workers still holding the old column list, or
// whose agent has not yet heard of the flip, name a column that is gone.
func (d *pass) dropAtOnce(ctx context.Context, committed time.Time, epoch int64, ackWait *fleet.AckWait, out *outcome) error {
	drops := make([]string, len(removedColumns))
	for i, c := range removedColumns {
		drops[i] = "DROP COLUMN " + pq.QuoteIdentifier(c)
	}
	dropCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	started := time.Now()
	_, err := d.db.ExecContext(dropCtx, fmt.Sprintf(`ALTER TABLE %s %s`, schema.QuoteTable(d.appTable), strings.Join(drops, ", ")))
	ended := time.Now()
	// Disarmed now: what it holds is what was recorded before the DROP
	// committed.
	out.ackedAtDrop, out.dropAfter = len(ackWait.Wait(ctx, 0)), started.Sub(committed)
	d.tl.at(committed, "flip L contract committed, epoch %d", epoch)
	if err != nil {
		return fmt.Errorf("drop without the gate: %w", err)
	}
	d.tl.at(ended, "DROP COLUMN %s done (started +%s after the flip); %d/%d agents had acknowledged", strings.Join(removedColumns, ", "), ms(out.dropAfter), out.ackedAtDrop, out.agents)
	return nil
}

func (d *pass) flip(ctx context.Context, to phase.Phase) (schema.FlipResult, error) {
	res, err := d.store.Flip(ctx, "L", to, schema.FlipOptions{Actor: "demo"})
	if err == nil {
		d.tl.now("flip L %s committed, epoch %d", to, res.Epoch)
	}
	return res, err
}

func (d *pass) createAppTable(ctx context.Context) error {
	_, err := d.db.ExecContext(ctx, fmt.Sprintf(`
		CREATE SCHEMA %[1]s;
		CREATE TABLE %[2]s (id bigserial PRIMARY KEY, name text, display_name text, host text);
		INSERT INTO %[2]s (name, display_name, host)
			SELECT 'vm-' || i, 'VM ' || i, 'compute-' || (i %% 10) FROM generate_series(1, 1000) AS i`,
		pq.QuoteIdentifier(d.appSchema), schema.QuoteTable(d.appTable)))
	return err
}

func (d *pass) remainingColumns(ctx context.Context) ([]string, error) {
	var cols []string
	err := d.db.SelectContext(ctx, &cols, `SELECT column_name FROM information_schema.columns WHERE table_schema = $1 AND table_name = 'instances' ORDER BY ordinal_position`, d.appSchema)
	return cols, err
}

func manifest(table string) string {
	return fmt.Sprintf(`release: L
description: merge name and display_name into common_name
expand:
  - ALTER TABLE %[1]s ADD COLUMN IF NOT EXISTS common_name text
preconditions:
  - name: every instance has a common_name
    sql: SELECT 1 FROM %[1]s WHERE common_name IS NULL LIMIT 1
removed:
  - table: %[2]s
    columns: [%[3]s]
`, schema.QuoteTable(table), table, strings.Join(removedColumns, ", "))
}

// firstError is the text of the first failure reported, if any.
func firstError(failures []error) string {
	if len(failures) == 0 {
		return ""
	}
	return oneLine(failures[0].Error())
}

// oneLine keeps an error on one line of the table.
func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}

// randomName is a short suffix that keeps two demos, or a demo and a
// test, out of each other's schemas and queues.
func randomName() string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// ms prints a duration in milliseconds, or in microseconds below one
// millisecond so that a DROP right after the flip does not read as 0.
func ms(d time.Duration) string {
	if d > 0 && d < time.Millisecond {
		return fmt.Sprintf("%dµs", d.Microseconds())
	}
	return fmt.Sprintf("%.1fms", float64(d.Microseconds())/1000)
}
