package broadcaster

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/schema"
)

const (
	// storeScrapeTimeout bounds the store queries of one scrape.
	storeScrapeTimeout = 5 * time.Second
	// storeScrapeCache is how long a scrape's reading of the store serves
	// later scrapes, so that many scrapers cannot hammer the database.
	storeScrapeCache = 5 * time.Second
	// convergenceGiveUp is how long after its commit a flip may take to
	// converge before it is no longer watched (counted as abandoned): an
	// agent whose code predates a release never acknowledges its contract.
	convergenceGiveUp = 10 * time.Minute
	// maxWatchedFlips bounds the flips watched at once; past it the oldest
	// is abandoned.
	maxWatchedFlips = 64
)

// convergenceBuckets span a fleet acknowledging in milliseconds up to
// convergenceGiveUp.
var convergenceBuckets = []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600}

// Kinds of flip, the label of the convergence families.
const (
	flipContract = "contract" // to contract: converged once every live agent acknowledged it (schema.Agent.Acked)
	flipDrain    = "drain"    // any other: converged once every live agent drained its epoch
)

// metrics is the broadcaster's instrumentation, on a registry of its own.
// The counters behind it are Stats, read at scrape time; only what has no
// counter there (latencies) is observed as it happens.
type metrics struct {
	reg         *prometheus.Registry
	confirm     prometheus.Histogram
	convergence *prometheus.HistogramVec
	abandoned   *prometheus.CounterVec
}

func newMetrics(b *Broadcaster) *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		confirm: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "phasecast_broadcaster_publish_confirm_seconds",
			Help:    "Time from publishing a state to the broker's confirm.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
		}),
		convergence: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "phasecast_flip_convergence_seconds",
			Help: "Time from a flip's commit until the store first counts every live agent done with it " +
				"(kind=contract: acknowledged; kind=drain: drained its epoch), on the database clock.",
			Buckets: convergenceBuckets,
		}, []string{"kind"}),
		abandoned: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "phasecast_flip_convergence_abandoned_total",
			Help: "Flips no longer watched for convergence: not converged within " + convergenceGiveUp.String() + ", or crowded out.",
		}, []string{"kind"}),
	}
	for _, k := range []string{flipContract, flipDrain} {
		m.convergence.WithLabelValues(k)
		m.abandoned.WithLabelValues(k)
	}
	m.reg.MustRegister(m.confirm, m.convergence, m.abandoned, &statsCollector{b: b}, &storeCollector{b: b})
	return m
}

// Metrics returns the broadcaster's own Prometheus registry, which
// Config.MetricsAddr serves. Register it (it is a prometheus.Gatherer) or
// add collectors to it; nothing is registered on the global registry.
func (b *Broadcaster) Metrics() *prometheus.Registry { return b.metrics.reg }

var (
	statusesDesc = prometheus.NewDesc("phasecast_broadcaster_statuses_received_total",
		"Status messages received, by result (recorded, replay, rejected) and, for rejected, reason.", []string{"result", "reason"}, nil)
	batchesDesc = prometheus.NewDesc("phasecast_broadcaster_status_batches_total",
		"Transactions that recorded statuses.", nil, nil)
	grantsDesc = prometheus.NewDesc("phasecast_broadcaster_grants_sent_total",
		"Lease grants handed to the broker.", nil, nil)
	grantsDroppedDesc = prometheus.NewDesc("phasecast_broadcaster_grants_dropped_total",
		"Grants not sent because the publishing connection was too far behind.", nil, nil)
	statesDesc = prometheus.NewDesc("phasecast_broadcaster_states_published_total",
		"State messages the broker confirmed, by kind (change, beacon).", []string{"kind"}, nil)
	leaderDesc = prometheus.NewDesc("phasecast_broadcaster_leader",
		"1 while this broadcaster holds the leader lock, else 0.", nil, nil)
	transitionsDesc = prometheus.NewDesc("phasecast_broadcaster_leadership_transitions_total",
		"Leadership changes of this broadcaster, by the side it went to (leader, standby).", []string{"to"}, nil)
	agentsDesc = prometheus.NewDesc("phasecast_agents",
		"Registered agents by service and state (live; old_code: live, but its code predates a release whose contract is pending; "+
			"fenced: lease ran out under "+schema.FencedFor.String()+" ago without a goodbye; expired).", []string{"service", "state"}, nil)
	lagDesc = prometheus.NewDesc("phasecast_outbox_lag_epochs",
		"Epochs the newest unpublished outbox row is ahead of the newest published one.", nil, nil)
	storeErrorsDesc = prometheus.NewDesc("phasecast_broadcaster_store_scrape_errors_total",
		"Scrapes whose reading of the store failed; phasecast_agents and phasecast_outbox_lag_epochs are left out of them.", nil, nil)
)

// statsCollector turns Stats into metrics at scrape time: the status path
// counts as it always has, and a reason added to Stats.Rejected shows up
// here by itself.
type statsCollector struct{ b *Broadcaster }

func (c *statsCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{statusesDesc, batchesDesc, grantsDesc, grantsDroppedDesc, statesDesc, leaderDesc, transitionsDesc} {
		ch <- d
	}
}

func (c *statsCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.b.Stats()
	counter := func(d *prometheus.Desc, v int64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	counter(statusesDesc, s.StatusesRecorded, "recorded", "")
	for reason, n := range s.Rejected {
		if reason == RejectStaleSeq {
			counter(statusesDesc, n, "replay", "")
			continue
		}
		counter(statusesDesc, n, "rejected", reason)
	}
	counter(batchesDesc, s.StatusBatches)
	counter(grantsDesc, s.GrantsSent)
	counter(grantsDroppedDesc, s.GrantsDropped)
	counter(statesDesc, s.StatesPublished-s.BeaconsPublished, "change")
	counter(statesDesc, s.BeaconsPublished, "beacon")
	leader := 0.0
	if c.b.IsLeader() {
		leader = 1
	}
	ch <- prometheus.MustNewConstMetric(leaderDesc, prometheus.GaugeValue, leader)
	counter(transitionsDesc, s.Takeovers, "leader")
	counter(transitionsDesc, s.StepDowns, "standby")
}

// storeCollector reads the agents' standings and the outbox lag from the
// store at scrape time, bounded by storeScrapeTimeout and cached for
// storeScrapeCache.
type storeCollector struct {
	b        *Broadcaster
	mu       sync.Mutex // one reading at a time; later scrapes wait and share it
	readAt   time.Time
	agents   map[[2]string]int // service, state
	lag      int64
	failures int64
	ok       bool
}

func (c *storeCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- agentsDesc
	ch <- lagDesc
	ch <- storeErrorsDesc
}

func (c *storeCollector) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if time.Since(c.readAt) >= storeScrapeCache {
		ctx, cancel := context.WithTimeout(context.Background(), storeScrapeTimeout)
		agents, lag, err := readStandings(ctx, c.b.cfg.Store)
		cancel()
		c.readAt, c.ok = time.Now(), err == nil
		if err != nil {
			c.failures++
			c.b.log.Warn().Err(err).Msg("metrics: reading the store failed; agents and outbox lag left out of this scrape")
		} else {
			c.agents, c.lag = agents, lag
		}
	}
	ch <- prometheus.MustNewConstMetric(storeErrorsDesc, prometheus.CounterValue, float64(c.failures))
	if !c.ok {
		return
	}
	for k, n := range c.agents {
		ch <- prometheus.MustNewConstMetric(agentsDesc, prometheus.GaugeValue, float64(n), k[0], k[1])
	}
	ch <- prometheus.MustNewConstMetric(lagDesc, prometheus.GaugeValue, float64(c.lag))
}

// Agent states as phasecast_agents labels them.
const (
	agentLive    = "live"
	agentOldCode = "old_code"
	agentFenced  = "fenced"
	agentExpired = "expired"
)

// readStandings counts the agents by service and state, each agent in one
// state (schema's classification: its lease standing, and old code if a
// pending contract's release is unknown to it), and reads the outbox lag.
// Every service has all four states, so a state that empties reads 0.
func readStandings(ctx context.Context, store *schema.Store) (map[[2]string]int, int64, error) {
	rep, err := store.Report(ctx, 0)
	if err != nil {
		return nil, 0, err
	}
	lag, err := store.OutboxLag(ctx)
	if err != nil {
		return nil, 0, err
	}
	var pending []schema.ReleaseStatus
	for _, r := range rep.Releases {
		if r.PendingContract() {
			pending = append(pending, r)
		}
	}
	out := make(map[[2]string]int)
	for _, a := range rep.Agents {
		for _, s := range []string{agentLive, agentOldCode, agentFenced, agentExpired} {
			out[[2]string{a.Service, s}] += 0
		}
		state := a.LeaseStanding()
		if state == schema.StandingLive {
			for _, r := range pending {
				if a.StandingIn(r) == schema.StandingOldCode {
					state = agentOldCode
					break
				}
			}
		}
		out[[2]string{a.Service, state}]++
	}
	return out, lag, nil
}

// flip is a published flip watched for convergence.
type flip struct {
	epoch     int64
	release   string // for a contract flip; empty for the others
	kind      string
	committed time.Time // the outbox row's created_at, on the database clock
}

// convergence watches the flips a term published until the store counts
// every live agent done with each, and observes the time each took. The
// publisher adds flips; the watch goroutine (watchConvergence) checks.
type convergence struct {
	mu      sync.Mutex
	pending []flip
	poke    chan struct{} // wakes the watch; 1-buffered
}

func newConvergence() *convergence { return &convergence{poke: make(chan struct{}, 1)} }

// published adds the flips of outbox rows a confirmed state announced.
func (c *convergence) published(m *metrics, evs []schema.Event) {
	if len(evs) == 0 {
		return
	}
	c.mu.Lock()
	for _, ev := range evs {
		f := flip{epoch: ev.Epoch, kind: flipDrain, committed: ev.CreatedAt}
		if ev.ToPhase == string(phase.Contract) {
			f.release, f.kind = ev.Release, flipContract
		}
		c.pending = append(c.pending, f)
	}
	for len(c.pending) > maxWatchedFlips {
		m.abandoned.WithLabelValues(c.pending[0].kind).Inc()
		c.pending = c.pending[1:]
	}
	c.mu.Unlock()
	c.wake()
}

// watchFlips starts watching the flips up to epoch that a confirmed state
// announced and the outbox does not yet mark published. Failing to read
// them costs their convergence observations only.
func (l *leader) watchFlips(ctx context.Context, epoch int64) {
	evs, err := l.b.cfg.Store.UnpublishedEvents(ctx, epoch)
	if err != nil {
		l.log.Warn().Err(err).Int64("epoch", epoch).Msg("reading the flips a state announced failed; their convergence is not measured")
		return
	}
	l.conv.published(l.b.metrics, evs)
}

// wake asks for a check without ever blocking: the status consumer calls
// it after every recorded batch.
func (c *convergence) wake() {
	select {
	case c.poke <- struct{}{}:
	default:
	}
}

// watchConvergence checks the watched flips after each recorded batch (a
// burst of batches is one check) and every tick (so that a flip nobody
// acknowledges is given up, and one whose last laggard's lease ran out is
// counted), until ctx ends. Each check is one count query per watched
// flip, and there are none while every published flip has converged.
func (l *leader) watchConvergence(ctx context.Context) {
	t := time.NewTicker(l.b.cfg.LivenessInterval)
	defer t.Stop()
	fails := failureLog{what: "convergence check"}
	for {
		select {
		case <-ctx.Done():
			return
		case <-l.conv.poke:
		case <-t.C:
		}
		fails.report(l.log, l.checkConvergence(ctx))
	}
}

func (l *leader) checkConvergence(ctx context.Context) error {
	c := l.conv
	c.mu.Lock()
	watched := append([]flip(nil), c.pending...)
	c.mu.Unlock()
	done := make(map[int64]bool, len(watched))
	var errs []error
	for _, f := range watched {
		octx, cancel := context.WithTimeout(ctx, dbTimeout)
		cv, err := l.b.cfg.Store.CountConverged(octx, f.release, f.epoch)
		cancel()
		if err != nil {
			errs = append(errs, fmt.Errorf("epoch %d: %w", f.epoch, err))
			continue
		}
		took := cv.Now.Sub(f.committed)
		switch {
		case cv.Converged():
			l.b.metrics.convergence.WithLabelValues(f.kind).Observe(max(took, 0).Seconds())
			l.log.Debug().Int64("epoch", f.epoch).Str("kind", f.kind).Dur("took", took).Int("agents", cv.Live).Msg("flip converged")
		case took > convergenceGiveUp:
			l.b.metrics.abandoned.WithLabelValues(f.kind).Inc()
			l.log.Info().Int64("epoch", f.epoch).Str("kind", f.kind).Int("done", cv.Done).Int("live", cv.Live).
				Msgf("flip not converged within %s; no longer watched", convergenceGiveUp)
		default:
			continue
		}
		done[f.epoch] = true
	}
	if len(done) > 0 {
		c.mu.Lock()
		kept := c.pending[:0]
		for _, f := range c.pending {
			if !done[f.epoch] {
				kept = append(kept, f)
			}
		}
		c.pending = kept
		c.mu.Unlock()
	}
	return errors.Join(errs...)
}

// Timeouts of the metrics server: a scrape is small, a client that sends
// or reads slowly is cut off.
const (
	metricsReadHeaderTimeout = 5 * time.Second
	metricsWriteTimeout      = 30 * time.Second
	metricsIdleTimeout       = time.Minute
	metricsShutdownTimeout   = 5 * time.Second
)

// metricsServer serves /metrics on Config.MetricsAddr from Start to Stop.
type metricsServer struct {
	srv  *http.Server
	addr net.Addr
	done chan struct{} // closed when Serve has returned
}

// startMetrics starts the metrics server if Config.MetricsAddr is set;
// nil if not.
func (b *Broadcaster) startMetrics() (*metricsServer, error) {
	if b.cfg.MetricsAddr == "" {
		return nil, nil
	}
	return b.serveMetrics(b.cfg.MetricsAddr)
}

// serveMetrics listens on addr and serves the registry's /metrics; the
// listen error is returned, so a taken port fails Start.
func (b *Broadcaster) serveMetrics(addr string) (*metricsServer, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("broadcaster: Config.MetricsAddr %q: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(b.metrics.reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError}))
	s := &metricsServer{
		srv: &http.Server{
			Handler:           mux,
			ReadHeaderTimeout: metricsReadHeaderTimeout,
			WriteTimeout:      metricsWriteTimeout,
			IdleTimeout:       metricsIdleTimeout,
		},
		addr: ln.Addr(),
		done: make(chan struct{}),
	}
	go func() {
		defer close(s.done)
		if err := s.srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			b.log.Error().Err(err).Msg("the metrics server stopped")
		}
	}()
	b.log.Info().Str("addr", s.addr.String()).Msg("serving metrics on /metrics")
	return s, nil
}

// stop shuts the server down, giving scrapes in flight a moment, and waits
// for it. A nil server does nothing.
func (s *metricsServer) stop() {
	if s == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), metricsShutdownTimeout)
	defer cancel()
	if err := s.srv.Shutdown(ctx); err != nil {
		_ = s.srv.Close()
	}
	<-s.done
}

// MetricsAddr is the address the metrics server listens on (useful with
// Config.MetricsAddr ":0"), or nil while it does not run.
func (b *Broadcaster) MetricsAddr() net.Addr {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.metricsSrv == nil {
		return nil
	}
	return b.metricsSrv.addr
}
