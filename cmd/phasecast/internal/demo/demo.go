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
	Out         io.Writer      // the timeline and summary
	Logger      zerolog.Logger // component logs; defaults to none
	// Name is the suffix of the demo's schemas and AMQP names. Defaults to
	// a random one.
	Name string
}

// Report is the demo's outcome.
type Report struct {
	Agents      int                    `json:"agents"`
	Queries     int64                  `json:"queries"`
	Failed      int64                  `json:"failed"`
	Refused     int64                  `json:"refused"`
	AckLatency  latency.Summary        `json:"ack_latency"`
	Dropped     []string               `json:"dropped"`
	ColumnsLeft []string               `json:"columns_left"`
	Contract    *schema.ContractResult `json:"contract"`
}

// ErrFailed means the demo ran but its promise did not hold.
var ErrFailed = errors.New("demo failed")

// timeline prints events with their offset from the start.
type timeline struct {
	out   io.Writer
	start time.Time
}

func (t *timeline) at(when time.Time, format string, args ...any) {
	fmt.Fprintf(t.out, "  %9.3fs  %s\n", when.Sub(t.start).Seconds(), fmt.Sprintf(format, args...))
}

func (t *timeline) now(format string, args ...any) { t.at(time.Now(), format, args...) }

// Run runs the demo.
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
	d := &run{opts: opts, tl: &timeline{out: opts.Out, start: time.Now()}}
	defer d.cleanup()
	return d.run(ctx)
}

type run struct {
	opts     Options
	tl       *timeline
	db       *sqlx.DB
	store    *schema.Store
	appTable string // "demo_x.instances"
	prefix   string
	cleanups []func()
}

func (d *run) defers(f func()) { d.cleanups = append(d.cleanups, f) }

func (d *run) cleanup() {
	for i := len(d.cleanups) - 1; i >= 0; i-- {
		d.cleanups[i]()
	}
}

func (d *run) run(ctx context.Context) (*Report, error) {
	o := d.opts
	storeSchema, appSchema := "phasecast_demo_"+o.Name, "demo_"+o.Name
	d.appTable, d.prefix = appSchema+".instances", "phasecast_demo_"+o.Name
	fmt.Fprintf(o.Out, "phasecast demo: %d services × %d workers; store schema %s, table %s\n\n", o.Agents, o.Workers, storeSchema, d.appTable)

	store, err := schema.Open(ctx, o.DatabaseURL, storeSchema)
	if err != nil {
		return nil, err
	}
	d.store, d.db = store, store.DB()
	d.defers(func() { store.Close() })
	d.defers(func() { _ = pgadmin.DropSchemas(context.Background(), d.db, storeSchema, appSchema) })
	if _, err := store.Migrate(ctx); err != nil {
		return nil, err
	}
	d.defers((&fleet.Env{AMQPURL: o.AMQPURL, Prefix: d.prefix}).DeleteAMQP)
	if err := d.createAppTable(ctx, appSchema); err != nil {
		return nil, err
	}
	d.tl.now("store migrated; %s created with 1000 rows", d.appTable)

	env := &fleet.Env{Store: store, DatabaseURL: o.DatabaseURL, AMQPURL: o.AMQPURL, Prefix: d.prefix, Logger: o.Logger}
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
	d.tl.at(committed, "flip L contract committed, epoch %d", flipped.Epoch)
	o.Logger.Debug().Int64("epoch", flipped.Epoch).Msg("contract flip committed")

	contract, err := store.Contract(ctx, "L", schema.ContractOptions{Timeout: 30 * time.Second, PollInterval: 10 * time.Millisecond, Actor: "demo", LeaderWithin: 5 * time.Second})
	// The runner has seen every ack in the store, so every commit has
	// been reported: Wait returns at once.
	ackTimes := latency.Since(ackWait.Wait(ctx, time.Second), committed)
	slices.Sort(ackTimes)
	if err != nil {
		return nil, err
	}
	if len(ackTimes) > 0 {
		d.tl.at(committed.Add(ackTimes[0]), "first acknowledgement recorded (+%s)", ms(ackTimes[0]))
		d.tl.at(committed.Add(ackTimes[len(ackTimes)-1]), "last acknowledgement recorded (+%s): %d/%d agents", ms(ackTimes[len(ackTimes)-1]), len(ackTimes), len(services.List))
	}
	d.tl.at(contract.DDLStart, "contracting: DDL start (lock_timeout 2s)")
	d.tl.at(contract.DDLEnd, "DDL end: dropped %s (%d attempt(s))", strings.Join(contract.Dropped, ", "), contract.Attempts)
	d.tl.now("release L complete")

	time.Sleep(500 * time.Millisecond) // traffic after the drop must succeed too
	rep := &Report{Agents: len(services.List), AckLatency: latency.Summarize(ackTimes), Dropped: contract.Dropped, Contract: contract}
	stopCtx, cancelStop := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	totals, err := services.Stop(stopCtx)
	cancelStop()
	failures := totals.Failures
	if err != nil {
		failures = append(failures, err)
	}
	rep.Queries, rep.Failed, rep.Refused = totals.Queries, totals.Failed, totals.Refused
	d.tl.now("services stopped")
	if rep.ColumnsLeft, err = d.remainingColumns(ctx, appSchema); err != nil {
		return nil, err
	}

	fmt.Fprintf(o.Out, "\nsummary\n")
	fmt.Fprintf(o.Out, "  queries run        %d\n", rep.Queries)
	fmt.Fprintf(o.Out, "  queries failed     %d\n", rep.Failed)
	fmt.Fprintf(o.Out, "  ack latency        p50 %s, p99 %s (flip commit → ack recorded, %d agents)\n", ms(rep.AckLatency.P50), ms(rep.AckLatency.P99), rep.AckLatency.N)
	fmt.Fprintf(o.Out, "  columns dropped    %s\n", strings.Join(rep.Dropped, ", "))
	fmt.Fprintf(o.Out, "  columns remaining  %s\n", strings.Join(rep.ColumnsLeft, ", "))
	for _, f := range failures {
		fmt.Fprintf(o.Out, "  failure: %v\n", f)
	}
	if rep.Failed > 0 || len(failures) > 0 || rep.AckLatency.N != len(services.List) {
		return rep, fmt.Errorf("%w: %d queries failed, %d of %d agents acknowledged", ErrFailed, rep.Failed, rep.AckLatency.N, len(services.List))
	}
	for _, c := range rep.ColumnsLeft {
		if c == "name" || c == "display_name" {
			return rep, fmt.Errorf("%w: column %q was not dropped", ErrFailed, c)
		}
	}
	fmt.Fprintf(o.Out, "\nok: every agent acknowledged before the drop, and not one query failed\n")
	return rep, nil
}

func (d *run) flip(ctx context.Context, to phase.Phase) (schema.FlipResult, error) {
	res, err := d.store.Flip(ctx, "L", to, schema.FlipOptions{Actor: "demo"})
	if err == nil {
		d.tl.now("flip L %s committed, epoch %d", to, res.Epoch)
	}
	return res, err
}

func (d *run) createAppTable(ctx context.Context, appSchema string) error {
	_, err := d.db.ExecContext(ctx, fmt.Sprintf(`
		CREATE SCHEMA %[1]s;
		CREATE TABLE %[2]s (id bigserial PRIMARY KEY, name text, display_name text, host text);
		INSERT INTO %[2]s (name, display_name, host)
			SELECT 'vm-' || i, 'VM ' || i, 'compute-' || (i %% 10) FROM generate_series(1, 1000) AS i`,
		pq.QuoteIdentifier(appSchema), schema.QuoteTable(d.appTable)))
	return err
}

func (d *run) remainingColumns(ctx context.Context, appSchema string) ([]string, error) {
	var cols []string
	err := d.db.SelectContext(ctx, &cols, `SELECT column_name FROM information_schema.columns WHERE table_schema = $1 AND table_name = 'instances' ORDER BY ordinal_position`, appSchema)
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
    columns: [name, display_name]
`, schema.QuoteTable(table), table)
}

// randomName is a short suffix that keeps two demos, or a demo and a
// test, out of each other's schemas and queues.
func randomName() string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func ms(d time.Duration) string { return fmt.Sprintf("%.1fms", float64(d.Microseconds())/1000) }
