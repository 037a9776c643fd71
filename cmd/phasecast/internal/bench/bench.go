package bench

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"strings"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/rs/zerolog"

	"github.com/phasecast/phasecast/agent"
	"github.com/phasecast/phasecast/broadcaster"
	"github.com/phasecast/phasecast/cmd/phasecast/fleet"
	"github.com/phasecast/phasecast/internal/amqpx"
	"github.com/phasecast/phasecast/internal/config"
	"github.com/phasecast/phasecast/internal/pgadmin"
	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/retry"
	"github.com/phasecast/phasecast/schema"
)

// Path is how the benchmark's agents learn of a flip.
type Path string

const (
	// PathDB: agents with a database handle and the broadcaster's public
	// key, the secure default: each starts from the store, and applies a
	// state message signed by the broadcaster for its store without a
	// read (agent.Config.ConfirmSignedStates).
	PathDB Path = "db"
	// PathDBRead: agents with a database handle that read the store for
	// every state (agent.Config.ConfirmSignedStates): the message only
	// says "look".
	PathDBRead Path = "dbread"
	// PathNoDB: agents without a database, which apply the state the
	// message carries.
	PathNoDB Path = "nodb"
)

// Options configure a run. The zero value of each field means its default.
type Options struct {
	// Agents are the fleet sizes, run in order. Defaults to 1, 100, 1000.
	Agents []int
	// Flips is how many flips (and floor rounds) each fleet size runs.
	// Defaults to 20.
	Flips int
	// PollInterval is the polling baseline's interval. Defaults to 1s.
	PollInterval time.Duration
	// AgentsPerConn is how many agents (and floor responders) share one
	// AMQP connection. Defaults to 50.
	AgentsPerConn int
	// Heartbeat is the agents' HeartbeatInterval. Defaults to 3s.
	Heartbeat time.Duration
	// Lease is the broadcaster's LeaseDuration. Defaults to
	// broadcaster.DefaultLeaseDuration.
	Lease time.Duration
	// BeaconInterval is the broadcaster's. Agents without a DB start on
	// the first beacon. Defaults to broadcaster.DefaultBeaconInterval.
	BeaconInterval time.Duration
	// Paths are the agent paths measured. Defaults to PathDB, PathDBRead,
	// PathNoDB.
	Paths []Path
	// StatusQueueType is the type of the status queue, and of the floor's
	// reply queue, which is declared alike (amqpx.StatusQueueClassic or
	// amqpx.StatusQueueQuorum). Defaults to the broadcaster's default.
	StatusQueueType string
	// DBConns bounds the agents' shared database pool, and the pollers'.
	// Defaults to 20.
	DBConns int
	// Pause is the least time between one flip's last ack and the next
	// flip; a random fraction of it is added. It keeps each flip clear of
	// the agents' ConfirmInterval (100ms) rate limit. Defaults to 150ms.
	Pause time.Duration
	// AckWatch is how acknowledgements are timed: "hook" (the
	// broadcaster's OnRecorded, exact and free) or "poll" (one count query
	// per millisecond). Defaults to "hook".
	AckWatch string
	// SkipPolling leaves the polling baseline out: a quicker run, or a
	// fleet too large for one poller per agent on this database.
	SkipPolling bool
	// Cost runs the cost measurements after the fleets.
	Cost bool
	// CostAgents is the fleet size of the cost measurements. Defaults to
	// 100.
	CostAgents int
	// CostDuration is how long each sustained-rate measurement runs.
	// Defaults to 3s.
	CostDuration time.Duration
	// ChartDir, if set, receives one SVG chart per fleet size.
	ChartDir string
	// ProfileDir, if set, receives a CPU profile of this process for each
	// measured phase (the flips only, not the start-up):
	// phasecast-<path>-<n>.prof, floor-<n>.prof, polling-<n>.prof.
	ProfileDir string

	DatabaseURL string
	AMQPURL     string
	// Progress receives one line per step. Defaults to io.Discard.
	Progress io.Writer
	// Logger receives the components' logs. Defaults to none.
	Logger zerolog.Logger
	// Name is the suffix of the run's schema and AMQP names. Defaults to a
	// random one.
	Name string

	started time.Time
}

func (o Options) withDefaults() Options {
	if len(o.Agents) == 0 {
		o.Agents = []int{1, 100, 1000}
	}
	if o.Flips == 0 {
		o.Flips = 20
	}
	if o.PollInterval == 0 {
		o.PollInterval = time.Second
	}
	if o.AgentsPerConn == 0 {
		o.AgentsPerConn = 50
	}
	if o.Heartbeat == 0 {
		o.Heartbeat = 3 * time.Second
	}
	if o.Lease == 0 {
		o.Lease = broadcaster.DefaultLeaseDuration
	}
	if o.BeaconInterval == 0 {
		o.BeaconInterval = broadcaster.DefaultBeaconInterval
	}
	if len(o.Paths) == 0 {
		o.Paths = []Path{PathDB, PathDBRead, PathNoDB}
	}
	if o.StatusQueueType == "" {
		o.StatusQueueType = amqpx.StatusQueueClassic
	}
	if o.DBConns == 0 {
		o.DBConns = 20
	}
	if o.Pause == 0 {
		o.Pause = 150 * time.Millisecond
	}
	if o.AckWatch == "" {
		o.AckWatch = "hook"
	}
	if o.CostAgents == 0 {
		o.CostAgents = 100
	}
	if o.CostDuration == 0 {
		o.CostDuration = 3 * time.Second
	}
	if o.DatabaseURL == "" {
		o.DatabaseURL = config.DefaultDatabaseURL
	}
	if o.AMQPURL == "" {
		o.AMQPURL = config.DefaultAMQPURL
	}
	if o.Progress == nil {
		o.Progress = io.Discard
	}
	if o.Name == "" {
		b := make([]byte, 4)
		_, _ = rand.Read(b)
		o.Name = hex.EncodeToString(b)
	}
	return o
}

// Validate checks defaulted options; each error names the option.
func (o Options) Validate() error {
	var errs []error
	for _, n := range o.Agents {
		if n < 1 || n > 100000 {
			errs = append(errs, fmt.Errorf("agents: %d is not a fleet size between 1 and 100000", n))
		}
	}
	if o.Flips < 1 {
		errs = append(errs, fmt.Errorf("flips: %d: give at least 1", o.Flips))
	}
	if o.PollInterval < time.Millisecond {
		errs = append(errs, fmt.Errorf("poll-interval: %s: give at least 1ms", o.PollInterval))
	}
	if o.AgentsPerConn < 1 {
		errs = append(errs, fmt.Errorf("agents-per-conn: %d: give at least 1", o.AgentsPerConn))
	}
	if o.Heartbeat < 10*time.Millisecond {
		errs = append(errs, fmt.Errorf("heartbeat: %s: give at least 10ms", o.Heartbeat))
	}
	if o.Lease < 2*o.Heartbeat+agent.DefaultLeaseMargin {
		errs = append(errs, fmt.Errorf("lease: %s: give at least twice the heartbeat (%s) and the agents' lease margin (%s), or every ack asks for a grant", o.Lease, o.Heartbeat, agent.DefaultLeaseMargin))
	}
	for _, p := range o.Paths {
		if p != PathDB && p != PathDBRead && p != PathNoDB {
			errs = append(errs, fmt.Errorf("paths: %q is not %q, %q or %q", p, PathDB, PathDBRead, PathNoDB))
		}
	}
	if o.StatusQueueType != amqpx.StatusQueueClassic && o.StatusQueueType != amqpx.StatusQueueQuorum {
		errs = append(errs, fmt.Errorf("status-queue-type: %q is not %q or %q", o.StatusQueueType, amqpx.StatusQueueClassic, amqpx.StatusQueueQuorum))
	}
	if o.DBConns < 2 {
		errs = append(errs, fmt.Errorf("db-conns: %d: give at least 2", o.DBConns))
	}
	if o.AckWatch != "hook" && o.AckWatch != "poll" {
		errs = append(errs, fmt.Errorf("ack-watch: %q is not hook or poll", o.AckWatch))
	}
	if o.CostAgents < 1 || o.CostDuration < 100*time.Millisecond {
		errs = append(errs, fmt.Errorf("cost: give at least 1 agent and 100ms (got %d, %s)", o.CostAgents, o.CostDuration))
	}
	return errors.Join(errs...)
}

// Report is a run's outcome. Durations are in milliseconds.
type Report struct {
	Machine Machine  `json:"machine"`
	Setup   Setup    `json:"setup"`
	Fleets  []*Fleet `json:"fleets"`
	Cost    *Cost    `json:"cost,omitempty"`
	Charts  []string `json:"charts,omitempty"`
}

// Machine describes where the run ran.
type Machine struct {
	CPUs       int    `json:"cpus"`
	CPUModel   string `json:"cpu_model"`
	MemoryGiB  int    `json:"memory_gib"`
	GoVersion  string `json:"go_version"`
	PostgreSQL string `json:"postgresql"`
	RabbitMQ   string `json:"rabbitmq"`
}

// Setup is what the run measured with.
type Setup struct {
	Flips           int     `json:"flips"`
	StatusQueueType string  `json:"status_queue_type"`
	AgentsPerConn   int     `json:"agents_per_conn"`
	HeartbeatMS     float64 `json:"heartbeat_ms"`
	LeaseMS         float64 `json:"lease_ms"`
	BeaconMS        float64 `json:"beacon_ms"`
	PollIntervalMS  float64 `json:"poll_interval_ms"`
	DBConns         int     `json:"db_conns"`
	AckWatch        string  `json:"ack_watch"`
	StateBytes      int     `json:"state_bytes"`
	StatusBytes     int     `json:"status_bytes"`
}

// Dist summarizes a set of latencies, in milliseconds.
type Dist struct {
	N     int     `json:"n"`
	MinMS float64 `json:"min_ms"`
	P50MS float64 `json:"p50_ms"`
	P99MS float64 `json:"p99_ms"`
	MaxMS float64 `json:"max_ms"`
}

// Measured is one kind of measurement at one fleet size: for each flip
// (or round), the time until the last of the fleet; and every member's own
// time, over all flips.
type Measured struct {
	PerFlip  Dist `json:"per_flip"`  // commit (or publish) → the last of N
	PerAgent Dist `json:"per_agent"` // commit (or publish) → each one, all flips
	// Missing counts acknowledgements, replies or sightings that never
	// came within the timeout; 0 in a sound run.
	Missing int `json:"missing"`
	// Delivered is, per flip, the time until the last member had the
	// message: an agent's new snapshot swapped in (Config.OnChange), a
	// floor responder's delivery. The rest of PerFlip is the way back.
	// Not measured for polling.
	Delivered *Dist `json:"delivered,omitempty"`
	// CPU is the processor time the measurement cost, per flip.
	CPU CPU `json:"cpu"`
	// BrokerBytesPerMember is the growth of the broker's resident memory
	// (its Erlang VM's RSS) from before the fleet (or the responders)
	// started to after, divided by its size: connections, channels,
	// queues and bindings. The VM keeps memory it freed, so a fleet
	// started after another may reuse some of it: read it as a lower
	// bound for all but the first fleet of a run. Not measured for
	// polling.
	BrokerBytesPerMember float64 `json:"broker_bytes_per_member,omitempty"`

	flips [][]time.Duration // per flip, each member's latency
}

// Phasecast is phasecast measured on one path at one fleet size.
type Phasecast struct {
	Path Path `json:"path"`
	Measured
	// HeapBytesPerAgent and GoroutinesPerAgent are the growth of the
	// process's live heap and goroutines from before the fleet started to
	// after, divided by its size (shared connections included).
	HeapBytesPerAgent  float64 `json:"heap_bytes_per_agent"`
	GoroutinesPerAgent float64 `json:"goroutines_per_agent"`
	StartSeconds       float64 `json:"start_seconds"`
	// FloorRatioP50 and FloorRatioP99 divide the per-flip p50 and p99 by
	// the floor's; PollingRatioP99 divides polling's per-flip p99 by this.
	FloorRatioP50   float64 `json:"floor_ratio_p50"`
	FloorRatioP99   float64 `json:"floor_ratio_p99"`
	PollingRatioP99 float64 `json:"polling_ratio_p99"`
}

// Polling is the polling baseline at one fleet size.
type Polling struct {
	Measured
	// QueriesPerSecond counts the pollers' own statements per second over
	// the measurement; DBXactPerSecond is the database's committed and
	// rolled-back transactions per second over the same time, from
	// pg_stat_database (every client of the database, this run's flips and
	// broadcaster included).
	QueriesPerSecond float64 `json:"queries_per_second"`
	DBXactPerSecond  float64 `json:"db_xact_per_second"`
}

// Fleet is every measurement at one fleet size.
type Fleet struct {
	Agents      int          `json:"agents"`
	Connections int          `json:"connections"`
	Floor       Measured     `json:"floor"`
	Phasecast   []*Phasecast `json:"phasecast"`
	// Polling is nil when Options.SkipPolling left it out.
	Polling *Polling `json:"polling,omitempty"`
}

// env is one run's corner of the servers.
type env struct {
	opts     Options
	store    *schema.Store
	prefix   string
	stateKey ed25519.PrivateKey // signs states and grants; agents hold its public half
	bc       *broadcaster.Broadcaster
	clock    *fleet.AckClock
	phase    phase.Phase // release L's phase
	epoch    int64       // the store's epoch
	agents   *sqlx.DB    // the agents' (and pollers') pool
	// appName is the application_name of every database session of the
	// run, so its backends can be told from other clients'.
	appName string
	// applied dates each agent's swap to the awaited epoch (OnChange).
	applied stamps
}

// Run runs the benchmark.
func Run(ctx context.Context, opts Options) (rep *Report, err error) {
	opts = opts.withDefaults()
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	opts.started = time.Now()
	name := "phasecast_bench_" + opts.Name
	e := &env{opts: opts, prefix: name, clock: &fleet.AckClock{}, appName: "phasecast-bench-" + opts.Name}
	// Every session of the run carries appName, unless the URL names an
	// application_name of its own (the PostgreSQL CPU figures are then 0).
	dsn, err := config.WithApplicationName(opts.DatabaseURL, e.appName)
	if err != nil {
		return nil, err
	}
	var cleanups []func()
	defer func() {
		for i := len(cleanups) - 1; i >= 0; i-- {
			cleanups[i]()
		}
	}()

	if e.store, err = schema.Open(ctx, dsn, name); err != nil {
		return nil, err
	}
	e.store.DB().SetMaxOpenConns(8)
	e.store.DB().SetMaxIdleConns(8)
	cleanups = append(cleanups, func() { _ = e.store.Close() })
	cleanups = append(cleanups, func() {
		_ = pgadmin.DropSchemas(context.Background(), e.store.DB(), name)
	})
	if _, err := e.store.Migrate(ctx); err != nil {
		return nil, err
	}
	secure := &fleet.Env{Store: e.store, AMQPURL: opts.AMQPURL}
	if err := secure.Secure(ctx); err != nil {
		return nil, err
	}
	e.stateKey = secure.StateKey
	cleanups = append(cleanups, e.deleteAMQP)
	if e.agents, err = sqlx.Open("postgres", dsn); err != nil {
		return nil, err
	}
	e.agents.SetMaxOpenConns(opts.DBConns)
	e.agents.SetMaxIdleConns(opts.DBConns)
	cleanups = append(cleanups, func() { _ = e.agents.Close() })

	rep = &Report{Machine: machine(ctx, e), Setup: Setup{
		Flips: opts.Flips, StatusQueueType: opts.StatusQueueType, AgentsPerConn: opts.AgentsPerConn, HeartbeatMS: ms(opts.Heartbeat),
		LeaseMS: ms(opts.Lease), BeaconMS: ms(opts.BeaconInterval),
		PollIntervalMS: ms(opts.PollInterval), DBConns: opts.DBConns, AckWatch: opts.AckWatch,
	}}
	m, err := schema.ParseManifest("bench L.yaml", []byte(manifest))
	if err != nil {
		return nil, err
	}
	applied, err := e.store.ApplyRelease(ctx, m, "bench")
	if err != nil {
		return nil, err
	}
	e.epoch, e.phase = applied.Epoch, phase.Expand
	if _, err := e.flip(ctx); err != nil { // expand → migrate; then contract ⇄ migrate
		return nil, err
	}

	bcfg := &broadcaster.Config{
		Store: e.store, DatabaseURL: dsn, AMQPURL: opts.AMQPURL, ExchangePrefix: e.prefix,
		BeaconInterval: opts.BeaconInterval, StatusQueueType: opts.StatusQueueType, LeaseDuration: opts.Lease,
		Logger:     opts.Logger.With().Str("component", "broadcaster").Logger(),
		SigningKey: e.stateKey,
	}
	// Installed in either mode: the cost measurements time acks with it.
	bcfg.OnRecorded = e.clock.OnRecorded
	if e.bc, err = (&fleet.Env{}).StartBroadcaster(ctx, bcfg, true); err != nil {
		return nil, err
	}
	cleanups = append(cleanups, func() { _ = e.bc.Stop(context.Background()) })
	if rep.Setup.StateBytes, rep.Setup.StatusBytes, err = e.messageSizes(ctx); err != nil {
		return nil, err
	}
	progress(opts, "bench: schema %s; broadcaster leading; %s", name, strings.TrimSpace(rep.Machine.summary()))

	for _, n := range opts.Agents {
		f := &Fleet{Agents: n, Connections: (n + opts.AgentsPerConn - 1) / opts.AgentsPerConn}
		rep.Fleets = append(rep.Fleets, f)
		for _, p := range opts.Paths {
			pc, err := e.runPhasecast(ctx, n, p)
			if err != nil {
				return rep, fmt.Errorf("phasecast, %d agents, path %s: %w", n, p, err)
			}
			f.Phasecast = append(f.Phasecast, pc)
		}
		if f.Floor, err = e.runFloor(ctx, n, rep.Setup.StateBytes, rep.Setup.StatusBytes); err != nil {
			return rep, fmt.Errorf("floor, %d responders: %w", n, err)
		}
		if !opts.SkipPolling {
			pl, err := e.runPolling(ctx, n)
			if err != nil {
				return rep, fmt.Errorf("polling, %d pollers: %w", n, err)
			}
			f.Polling = &pl
		}
		for _, pc := range f.Phasecast {
			pc.FloorRatioP50 = ratio(pc.PerFlip.P50MS, f.Floor.PerFlip.P50MS)
			pc.FloorRatioP99 = ratio(pc.PerFlip.P99MS, f.Floor.PerFlip.P99MS)
			if f.Polling != nil {
				pc.PollingRatioP99 = ratio(f.Polling.PerFlip.P99MS, pc.PerFlip.P99MS)
			}
		}
		if opts.ChartDir != "" {
			file, err := writeChart(opts.ChartDir, f, rep.Setup)
			if err != nil {
				return rep, err
			}
			rep.Charts = append(rep.Charts, file)
		}
	}
	if opts.Cost {
		if rep.Cost, err = e.runCost(ctx); err != nil {
			return rep, fmt.Errorf("cost: %w", err)
		}
	}
	return rep, nil
}

// manifest is the release the benchmark flips: no SQL, two removed columns.
const manifest = `release: L
description: phasecast bench
removed:
  - table: instances
    columns: [name, display_name]
`

// benchTables is what every benchmark agent registers.
func benchTables() map[string][]string {
	return map[string][]string{"instances": {"id", "name", "display_name", "common_name"}}
}

// flip moves L on: expand → migrate, then contract ⇄ migrate. It returns
// when the commit's reply arrived, and that time.
func (e *env) flip(ctx context.Context) (time.Time, error) {
	to := phase.Contract
	if e.phase != phase.Migrate {
		to = phase.Migrate
	}
	res, err := e.store.Flip(ctx, "L", to, schema.FlipOptions{Actor: "bench"})
	at := time.Now()
	if err != nil {
		return at, err
	}
	if res.Epoch != e.epoch+1 {
		return at, fmt.Errorf("flip to %s committed epoch %d, expected %d: is something else writing schema %s?", to, res.Epoch, e.epoch+1, e.store.Schema())
	}
	e.epoch, e.phase = res.Epoch, to
	return at, nil
}

// pause waits Options.Pause plus up to as much again, at random, between
// flips.
func (e *env) pause(ctx context.Context) error {
	return retry.Sleep(ctx, e.opts.Pause+time.Duration(randN(int64(e.opts.Pause))))
}

func (e *env) deleteAMQP() {
	(&fleet.Env{AMQPURL: e.opts.AMQPURL, Prefix: e.prefix}).DeleteTopology(
		[]string{floorReplies(e.prefix), grantSink(e.prefix)}, []string{floorExchange(e.prefix)})
}

// machine describes this machine and the servers.
func machine(ctx context.Context, e *env) Machine {
	m := Machine{CPUs: runtime.NumCPU(), GoVersion: runtime.Version(), CPUModel: "unknown"}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.SplitSeq(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPUModel = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		var kb int64
		for line := range strings.SplitSeq(string(b), "\n") {
			if _, err := fmt.Sscanf(line, "MemTotal: %d kB", &kb); err == nil {
				m.MemoryGiB = int((kb + 1<<19) >> 20)
				break
			}
		}
	}
	_ = e.store.DB().GetContext(ctx, &m.PostgreSQL, `SELECT current_setting('server_version')`)
	if conn, err := amqpx.Dial(e.opts.AMQPURL, "phasecast bench version"); err == nil {
		if v, ok := conn.Properties["version"].(string); ok {
			m.RabbitMQ = v
		}
		_ = conn.Close()
	}
	return m
}

func (m Machine) summary() string {
	return fmt.Sprintf("%d CPUs (%s), %d GiB, %s, PostgreSQL %s, RabbitMQ %s", m.CPUs, m.CPUModel, m.MemoryGiB, m.GoVersion, m.PostgreSQL, m.RabbitMQ)
}

// progress prints one line, with the time since Run began.
func progress(o Options, format string, args ...any) {
	fmt.Fprintf(o.Progress, "%6.1fs "+format+"\n", append([]any{time.Since(o.started).Seconds()}, args...)...)
}

func ms(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e6 }

func ratio(a, b float64) float64 {
	if b <= 0 {
		return 0
	}
	return a / b
}
