package integration

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/agent"
	"github.com/phasecast/phasecast/broadcaster"
)

// scrape reads url's /metrics over HTTP and parses the text format.
func scrape(t *testing.T, url string) map[string]*dto.MetricFamily {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	require.NoError(t, err)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, resp.StatusCode, string(body))
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(bytes.NewReader(body))
	require.NoError(t, err)
	return fams
}

// series finds the metric of family name whose labels include every pair
// of labels, or nil.
func series(fams map[string]*dto.MetricFamily, name string, labels ...string) *dto.Metric {
	f := fams[name]
	if f == nil {
		return nil
	}
next:
	for _, m := range f.GetMetric() {
		have := map[string]string{}
		for _, l := range m.GetLabel() {
			have[l.GetName()] = l.GetValue()
		}
		for i := 0; i+1 < len(labels); i += 2 {
			if have[labels[i]] != labels[i+1] {
				continue next
			}
		}
		return m
	}
	return nil
}

// convergenceCount is the count of the convergence histogram for kind.
func convergenceCount(fams map[string]*dto.MetricFamily, kind string) uint64 {
	m := series(fams, "phasecast_flip_convergence_seconds", "kind", kind)
	if m == nil {
		return 0
	}
	return m.GetHistogram().GetSampleCount()
}

// TestMetricsScrapeDuringFlip scrapes a real broadcaster's /metrics over
// HTTP while its agents follow two flips (one to migrate, one to
// contract): every family is there with its type, the counters moved, and
// the convergence histogram counted each flip once, under its kind.
func TestMetricsScrapeDuringFlip(t *testing.T) {
	t.Parallel()
	e := e2eSetup(t)
	e.createInstances()
	e.apply(e2eReleaseL)
	b := e.startBroadcaster(true, func(c *broadcaster.Config) { c.MetricsAddr = "127.0.0.1:0" })
	require.NotNil(t, b.MetricsAddr())
	url := "http://" + b.MetricsAddr().String() + "/metrics"
	agents := e.startAgents(3, func(i int) agent.Config { return e.agentConfig(fmt.Sprintf("svc-%d", i%2), i == 0) })

	// Applying the release was a flip to expand, which the broadcaster
	// published on start: it converges once the agents are up.
	var fams map[string]*dto.MetricFamily
	e2eWaitFor(t, e2eWait, "the release's apply to converge", func() bool {
		fams = scrape(t, url)
		return convergenceCount(fams, "drain") >= 1
	})
	require.Equal(t, uint64(1), convergenceCount(fams, "drain"))
	require.Zero(t, convergenceCount(fams, "contract"))

	// Scrapers run throughout the flips, as Prometheus would.
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() {
		for ctx.Err() == nil {
			resp, err := http.Get(url)
			if err == nil {
				_, _ = io.Copy(io.Discard, resp.Body)
				_ = resp.Body.Close()
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
	defer func() { cancel(); wg.Wait() }()

	epoch := e.toMigrate()
	e.waitDrained(epoch, agents...)
	e2eWaitFor(t, e2eWait, "the drain flip's convergence to be counted", func() bool {
		fams = scrape(t, url)
		return convergenceCount(fams, "drain") >= 2
	})
	require.Equal(t, uint64(2), convergenceCount(fams, "drain"), "the flip to migrate is observed once")

	contract := e.flipChecked("L")
	e.waitDrained(contract, agents...)
	e2eWaitFor(t, e2eWait, "the contract flip's convergence to be counted", func() bool {
		fams = scrape(t, url)
		return convergenceCount(fams, "contract") >= 1
	})
	// A beacon, a heartbeat and the next check must not count it again.
	time.Sleep(3 * e2eBeacon)
	fams = scrape(t, url)
	require.Equal(t, uint64(1), convergenceCount(fams, "contract"), "the flip to contract is observed once")
	require.Equal(t, uint64(2), convergenceCount(fams, "drain"))
	conv := series(fams, "phasecast_flip_convergence_seconds", "kind", "contract").GetHistogram()
	require.Less(t, conv.GetSampleSum(), e2eWait.Seconds(), "convergence is measured from the commit, in seconds")

	types := map[string]dto.MetricType{
		"phasecast_agents":                                   dto.MetricType_GAUGE,
		"phasecast_outbox_lag_epochs":                        dto.MetricType_GAUGE,
		"phasecast_broadcaster_statuses_received_total":      dto.MetricType_COUNTER,
		"phasecast_broadcaster_status_batches_total":         dto.MetricType_COUNTER,
		"phasecast_broadcaster_grants_sent_total":            dto.MetricType_COUNTER,
		"phasecast_broadcaster_grants_dropped_total":         dto.MetricType_COUNTER,
		"phasecast_broadcaster_states_published_total":       dto.MetricType_COUNTER,
		"phasecast_broadcaster_publish_confirm_seconds":      dto.MetricType_HISTOGRAM,
		"phasecast_broadcaster_leader":                       dto.MetricType_GAUGE,
		"phasecast_broadcaster_leadership_transitions_total": dto.MetricType_COUNTER,
		"phasecast_broadcaster_store_scrape_errors_total":    dto.MetricType_COUNTER,
		"phasecast_flip_convergence_seconds":                 dto.MetricType_HISTOGRAM,
		"phasecast_flip_convergence_abandoned_total":         dto.MetricType_COUNTER,
	}
	for name, typ := range types {
		require.Contains(t, fams, name)
		require.Equal(t, typ, fams[name].GetType(), name)
	}

	value := func(name string, labels ...string) float64 {
		t.Helper()
		m := series(fams, name, labels...)
		require.NotNil(t, m, "%s %v", name, labels)
		switch {
		case m.Gauge != nil:
			return m.GetGauge().GetValue()
		case m.Counter != nil:
			return m.GetCounter().GetValue()
		}
		return float64(m.GetHistogram().GetSampleCount())
	}
	require.Equal(t, 2.0, value("phasecast_agents", "service", "svc-0", "state", "live"))
	require.Equal(t, 1.0, value("phasecast_agents", "service", "svc-1", "state", "live"))
	require.Equal(t, 0.0, value("phasecast_agents", "service", "svc-1", "state", "old_code"))
	require.Equal(t, 0.0, value("phasecast_outbox_lag_epochs"))
	require.Positive(t, value("phasecast_broadcaster_statuses_received_total", "result", "recorded"))
	require.Equal(t, 0.0, value("phasecast_broadcaster_statuses_received_total", "result", "rejected", "reason", broadcaster.RejectBadSignature))
	require.Contains(t, fams, "phasecast_broadcaster_statuses_received_total")
	require.NotNil(t, series(fams, "phasecast_broadcaster_statuses_received_total", "result", "replay"))
	require.Positive(t, value("phasecast_broadcaster_grants_sent_total"))
	require.Positive(t, value("phasecast_broadcaster_states_published_total", "kind", "change"))
	require.Positive(t, value("phasecast_broadcaster_publish_confirm_seconds"))
	require.Equal(t, 1.0, value("phasecast_broadcaster_leader"))
	require.Equal(t, 1.0, value("phasecast_broadcaster_leadership_transitions_total", "to", "leader"))
	require.Equal(t, 0.0, value("phasecast_broadcaster_leadership_transitions_total", "to", "standby"))
	require.Equal(t, 0.0, value("phasecast_flip_convergence_abandoned_total", "kind", "contract"))

	// The cost of a scrape, mostly served from the store cache.
	const n = 200
	began := time.Now()
	for range n {
		scrape(t, url)
	}
	t.Logf("%d scrapes in %s: %s each", n, time.Since(began).Round(time.Millisecond), (time.Since(began) / n).Round(time.Microsecond))

	// Stop ends the server with the daemon.
	e2eStopBroadcaster(t, b)
	require.Nil(t, b.MetricsAddr())
	_, err := http.Get(url)
	require.Error(t, err, "the metrics server stops with the broadcaster")
}

// TestMetricsAddrTaken: a metrics address that cannot be listened on
// fails Start with an error that names the setting.
func TestMetricsAddrTaken(t *testing.T) {
	t.Parallel()
	e := e2eSetup(t)
	first := e.startBroadcaster(false, func(c *broadcaster.Config) { c.MetricsAddr = "127.0.0.1:0" })
	cfg := e.broadcasterConfig()
	cfg.MetricsAddr = first.MetricsAddr().String()
	b, err := broadcaster.New(cfg)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), e2eWait)
	defer cancel()
	err = b.Start(ctx)
	require.ErrorContains(t, err, "Config.MetricsAddr")
	require.ErrorContains(t, err, "address already in use")
	require.False(t, b.IsLeader())
	require.Nil(t, b.MetricsAddr())
}

// TestAgentCollectorOnPrivateRegistry: the agent's collector reports on
// the registry the service gives it, and on nothing else: its epochs
// follow a flip, and the time to the ack is counted.
func TestAgentCollectorOnPrivateRegistry(t *testing.T) {
	t.Parallel()
	e := e2eSetup(t)
	e.createInstances()
	e.apply(e2eReleaseL)
	e.startBroadcaster(true, nil)
	a := e.startAgent(e.agentConfig("collected", false))

	reg := prometheus.NewRegistry()
	reg.MustRegister(a.Collector())
	// Twelve single series, resyncs ok and failed, and every reject reason
	// (ten when this was written), each present before it happens.
	reasons := testutil.CollectAndCount(a.Collector(), "phasecast_agent_rejected_messages_total")
	require.GreaterOrEqual(t, reasons, 10)
	require.Equal(t, 12+2+reasons, testutil.CollectAndCount(a.Collector()))
	problems, err := testutil.GatherAndLint(reg)
	require.NoError(t, err)
	require.Empty(t, problems, "names and help follow Prometheus' conventions")

	epoch := e.toMigrate()
	e.waitDrained(epoch, a)
	fams, err := reg.Gather()
	require.NoError(t, err)
	byName := map[string]*dto.MetricFamily{}
	for _, f := range fams {
		byName[f.GetName()] = f
	}
	gauge := func(name string) float64 {
		t.Helper()
		require.Contains(t, byName, name)
		require.Equal(t, dto.MetricType_GAUGE, byName[name].GetType(), name)
		m := byName[name].GetMetric()[0]
		require.Equal(t, "collected", m.GetLabel()[0].GetValue(), "the service label")
		return m.GetGauge().GetValue()
	}
	require.Equal(t, float64(epoch), gauge("phasecast_agent_applied_epoch"))
	require.Equal(t, float64(epoch), gauge("phasecast_agent_drained_epoch"))
	require.Equal(t, 0.0, gauge("phasecast_agent_fenced"))
	require.Equal(t, 0.0, gauge("phasecast_agent_old_snapshot_guards"))
	require.Positive(t, gauge("phasecast_agent_lease_remaining_seconds"))
	ack := byName["phasecast_agent_ack_delay_seconds"]
	require.Equal(t, dto.MetricType_HISTOGRAM, ack.GetType())
	require.GreaterOrEqual(t, ack.GetMetric()[0].GetHistogram().GetSampleCount(), uint64(1), "the flip's ack was timed")
	for _, name := range []string{"phasecast_agent_reconnects_total", "phasecast_agent_rejected_messages_total", "phasecast_agent_fencings_total",
		"phasecast_agent_statuses_sent_total", "phasecast_agent_stale_refusals_total", "phasecast_agent_resyncs_total"} {
		require.Contains(t, byName, name)
		require.Equal(t, dto.MetricType_COUNTER, byName[name].GetType(), name)
	}

	// Nothing went to the global registry.
	global, err := prometheus.DefaultGatherer.Gather()
	require.NoError(t, err)
	for _, f := range global {
		require.NotContains(t, f.GetName(), "phasecast_", "the agent registers nothing globally")
	}
}
