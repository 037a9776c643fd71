package agent

import (
	"github.com/prometheus/client_golang/prometheus"
)

// Collector returns a prometheus.Collector of the agent's Stats, for the
// service to register on a registry of its own choosing; the agent
// registers nothing anywhere. Every metric reads Stats at collect time, so
// Enter and Exit pay nothing for it. Each carries a service label: to
// register two agents of one service on one registry, wrap it with
// prometheus.WrapRegistererWith and a label that tells them apart.
func (a *Agent) Collector() prometheus.Collector {
	return newCollector(a, prometheus.Labels{"service": a.cfg.Service})
}

type collector struct {
	a *Agent

	applied, drained, fenced, lease, inflight *prometheus.Desc
	ackDelay                                  *prometheus.Desc
	reconnects, rejected, fencings, sent      *prometheus.Desc
	staleRefusals, resyncs                    *prometheus.Desc
	unconfirmed, ignored                      *prometheus.Desc
}

func newCollector(a *Agent, labels prometheus.Labels) *collector {
	desc := func(name, help string, variable ...string) *prometheus.Desc {
		return prometheus.NewDesc("phasecast_agent_"+name, help, variable, labels)
	}
	return &collector{
		a:             a,
		applied:       desc("applied_epoch", "Epoch of the snapshot the agent holds (-1 before any)."),
		drained:       desc("drained_epoch", "Newest epoch acknowledged: no guard of an older snapshot was open (-1 before any)."),
		fenced:        desc("fenced", "1 while the agent's lease has run out (it refuses or re-syncs every Enter), else 0."),
		lease:         desc("lease_remaining_seconds", "Time left on the agent's lease; negative once it ran out."),
		inflight:      desc("old_snapshot_guards", "Guards still open on snapshots older than the current one: what the acknowledgement waits for."),
		ackDelay:      desc("ack_delay_seconds", "Time from applying a state to sending its acknowledgement, once per acknowledged epoch."),
		reconnects:    desc("reconnects_total", "AMQP sessions after the first."),
		rejected:      desc("rejected_messages_total", "Messages dropped, by reason.", "reason"),
		fencings:      desc("fencings_total", "Times the agent's lease ran out."),
		sent:          desc("statuses_sent_total", "Statuses sent, over AMQP or through the store."),
		staleRefusals: desc("stale_refusals_total", "Enter calls refused with ErrStale."),
		resyncs:       desc("resyncs_total", "Reads of the whole state from the store, by result (ok, failed).", "result"),
		unconfirmed:   desc("unconfirmed_statuses_total", "Statuses the broker nacked, returned or did not confirm in time; each dropped the connection."),
		ignored:       desc("ignored_statuses_total", "Statuses the store did not record (another live process holds the ID, or a newer seq): the agent stays fenced."),
	}
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.applied, c.drained, c.fenced, c.lease, c.inflight, c.ackDelay,
		c.reconnects, c.rejected, c.fencings, c.sent, c.staleRefusals, c.resyncs, c.unconfirmed, c.ignored} {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	s := c.a.Stats()
	gauge := func(d *prometheus.Desc, v float64) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v)
	}
	counter := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
	}
	gauge(c.applied, float64(s.AppliedEpoch))
	gauge(c.drained, float64(s.DrainedEpoch))
	fenced := 0.0
	if s.Fenced {
		fenced = 1
	}
	gauge(c.fenced, fenced)
	gauge(c.lease, s.LeaseRemaining.Seconds())
	gauge(c.inflight, float64(s.Inflight))
	buckets := make(map[float64]uint64, len(AckDelayBuckets))
	for i, b := range AckDelayBuckets {
		buckets[b.Seconds()] = s.AckDelays.Buckets[i]
	}
	ch <- prometheus.MustNewConstHistogram(c.ackDelay, s.AckDelays.Count, s.AckDelays.Sum.Seconds(), buckets)
	counter(c.reconnects, float64(s.Reconnects))
	// Every reason, so that a rate over one that never happened reads 0.
	for _, r := range rejectReasons {
		counter(c.rejected, float64(s.RejectedMessages[r]), r)
	}
	counter(c.fencings, float64(s.Fencings))
	counter(c.sent, float64(s.StatusesSent))
	counter(c.staleRefusals, float64(s.StaleRefusals))
	counter(c.resyncs, float64(s.Resyncs), "ok")
	counter(c.resyncs, float64(s.ResyncFailures), "failed")
	counter(c.unconfirmed, float64(s.UnconfirmedStatuses))
	counter(c.ignored, float64(s.StatusesIgnored))
}
