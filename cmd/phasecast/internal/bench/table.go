package bench

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"
)

// WriteText prints the report as tables.
func (r *Report) WriteText(w io.Writer) error {
	var b strings.Builder
	s := r.Setup
	fmt.Fprintf(&b, "phasecast bench: %s\n", r.Machine.summary())
	fmt.Fprintf(&b, "%d flips per fleet size; %d agents per AMQP connection; agent heartbeat %s, lease %s, beacon %s; polling every %s; acks timed by %s\n",
		s.Flips, s.AgentsPerConn, time.Duration(s.HeartbeatMS*1e6), time.Duration(s.LeaseMS*1e6), time.Duration(s.BeaconMS*1e6),
		time.Duration(s.PollIntervalMS*1e6), ackWatchName(s.AckWatch))
	fmt.Fprintf(&b, "state message %d bytes, status %d bytes (the floor sends the same sizes); status queue and the floor's reply queue: %s\n\n", s.StateBytes, s.StatusBytes, s.StatusQueueType)

	fmt.Fprintf(&b, "time from a flip's commit until the last of N has it (ms, over the flips):\n")
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "agents\tconns\tmeasured\t\tmin\tp50\tp99\tmax\tmissing\t\tdelivered p50\tp99\t\tcpu/flip: self\tbroker\tpostgres\t\n")
	for _, f := range r.Fleets {
		row := func(what string, m Measured, conns string) {
			d := m.PerFlip
			del := "\t"
			if m.Delivered != nil {
				del = fmtMS(m.Delivered.P50MS) + "\t" + fmtMS(m.Delivered.P99MS)
			}
			fmt.Fprintf(tw, "%d\t%s\t%s\t\t%s\t%s\t%s\t%s\t%d\t\t%s\t\t%.1f\t%.1f\t%.1f\t\n", f.Agents, conns, what, fmtMS(d.MinMS), fmtMS(d.P50MS), fmtMS(d.P99MS), fmtMS(d.MaxMS), m.Missing,
				del, m.CPU.SelfMSPerFlip, m.CPU.BrokerMSPerFlip, m.CPU.PostgresMSPerFlip)
		}
		conns := fmt.Sprint(f.Connections)
		row("floor (bare amqp091)", f.Floor, conns)
		for _, pc := range f.Phasecast {
			row(pathName(pc.Path), pc.Measured, conns)
		}
		if f.Polling != nil {
			row(fmt.Sprintf("polling every %s", time.Duration(s.PollIntervalMS*1e6)), f.Polling.Measured, "-")
		}
	}
	_ = tw.Flush()

	fmt.Fprintf(&b, "\nratios (per-flip figures above):\n")
	tw = tabwriter.NewWriter(&b, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "agents\tpath\t\tphasecast/floor p50\tp99\tpolling/phasecast p99\tpolling queries/s\tdb xact/s\t\n")
	for _, f := range r.Fleets {
		for _, pc := range f.Phasecast {
			if f.Polling == nil {
				fmt.Fprintf(tw, "%d\t%s\t\t%.2f×\t%.2f×\t-\t-\t-\t\n", f.Agents, pathName(pc.Path), pc.FloorRatioP50, pc.FloorRatioP99)
				continue
			}
			fmt.Fprintf(tw, "%d\t%s\t\t%.2f×\t%.2f×\t%.1f×\t%.0f\t%.0f\t\n", f.Agents, pathName(pc.Path), pc.FloorRatioP50, pc.FloorRatioP99, pc.PollingRatioP99, f.Polling.QueriesPerSecond, f.Polling.DBXactPerSecond)
		}
	}
	_ = tw.Flush()

	fmt.Fprintf(&b, "\neach agent's own time (ms, all flips):\n")
	tw = tabwriter.NewWriter(&b, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "agents\tmeasured\t\tn\tmin\tp50\tp99\tmax\theap/agent\tgoroutines/agent\tbroker/agent\tstart\t\n")
	for _, f := range r.Fleets {
		d := f.Floor.PerAgent
		fmt.Fprintf(tw, "%d\t%s\t\t%d\t%s\t%s\t%s\t%s\t\t\t%.1f KiB\t\t\n", f.Agents, "floor (bare amqp091)", d.N, fmtMS(d.MinMS), fmtMS(d.P50MS), fmtMS(d.P99MS), fmtMS(d.MaxMS),
			f.Floor.BrokerBytesPerMember/1024)
		for _, pc := range f.Phasecast {
			d := pc.PerAgent
			fmt.Fprintf(tw, "%d\t%s\t\t%d\t%s\t%s\t%s\t%s\t%.1f KiB\t%.1f\t%.1f KiB\t%.1fs\t\n", f.Agents, pathName(pc.Path), d.N, fmtMS(d.MinMS), fmtMS(d.P50MS), fmtMS(d.P99MS), fmtMS(d.MaxMS),
				pc.HeapBytesPerAgent/1024, pc.GoroutinesPerAgent, pc.BrokerBytesPerMember/1024, pc.StartSeconds)
		}
		if f.Polling == nil {
			continue
		}
		d = f.Polling.PerAgent
		fmt.Fprintf(tw, "%d\t%s\t\t%d\t%s\t%s\t%s\t%s\t\t\t\t\t\n", f.Agents, "polling", d.N, fmtMS(d.MinMS), fmtMS(d.P50MS), fmtMS(d.P99MS), fmtMS(d.MaxMS))
	}
	_ = tw.Flush()

	if c := r.Cost; c != nil {
		fmt.Fprintf(&b, "\ncost, %d agents:\n", c.Agents)
		for _, a := range c.AckedFlips {
			fmt.Fprintf(&b, "  acknowledged flips, closed loop (%s): %.1f flips/s (%d flips)\n", pathName(a.Path), a.FlipsPerSecond, a.Flips)
		}
		if bu := c.Burst; bu.Flips > 0 {
			fmt.Fprintf(&b, "  flips back to back (agents without DB): %.0f flips/s committed, %.0f states/s published (coalesced), every agent acked the last %.1fms after its commit\n",
				bu.FlipsPerSecond, bu.StatesPerSecond, bu.CatchUpMS)
		}
		st := c.Statuses
		fmt.Fprintf(&b, "  status intake (one publisher, %d agent ids): %.0f statuses/s recorded, %.0f batches/s, %.0f grants/s (offered %.0f/s)\n",
			st.DistinctAgents, st.RecordedPerSec, st.BatchesPerSec, st.GrantsPerSec, st.OfferedPerSecond)
	}
	for _, c := range r.Charts {
		fmt.Fprintf(&b, "chart: %s\n", c)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func pathName(p Path) string {
	switch p {
	case PathDB:
		return "phasecast, agents with DB"
	case PathDBRead:
		return "phasecast, DB, read per state"
	}
	return "phasecast, agents without DB"
}

func ackWatchName(w string) string {
	if w == "poll" {
		return "polling the agents table every 1ms"
	}
	return "the broadcaster's commit (OnRecorded)"
}
