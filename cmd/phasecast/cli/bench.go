package cli

import (
	"io"
	"strings"
	"time"

	"github.com/rs/zerolog"
	"github.com/spf13/cobra"

	"github.com/phasecast/phasecast/broadcaster"
	"github.com/phasecast/phasecast/cmd/phasecast/internal/bench"
	"github.com/phasecast/phasecast/internal/amqpx"
)

func init() { extraCommands = append(extraCommands, newBenchCmd) }

func newBenchCmd(g *globals) *cobra.Command {
	var (
		opts    bench.Options
		paths   []string
		asJSON  bool
		polling bool
		verbose bool
		quiet   bool
	)
	cmd := &cobra.Command{
		Use:   "bench",
		Short: "Measure a flip's way to every agent against bare AMQP and against polling, on real servers",
		Long: `For each fleet size, in this process and against the configured servers:

  phasecast  a broadcaster and N agents (no workers); each flip is timed from
             its commit to the commit of the last agent's acknowledgement in
             the store, with agents that confirm in the store (--paths db,
             the secure default) and agents that trust the message (nodb);
  floor      the same fan-out and reply with bare amqp091-go, none of
             phasecast's logic, on the same connection layout;
  polling    N pollers reading the store's epoch every --poll-interval,
             timed until the last has seen the flip, with the queries per
             second they cost.

Then, with --cost, the broadcaster's sustained flips per second with
--cost-agents agents and its status intake. Prints tables (or --json) with
the ratios phasecast/floor and polling/phasecast; --chart DIR writes an
SVG of the acknowledgement-latency distribution per fleet size.

It uses a schema and AMQP names of its own and removes them afterwards;
--schema and --exchange-prefix are not used.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			opts.DatabaseURL, opts.AMQPURL = g.databaseURL, g.amqpURL
			opts.Paths = nil
			for _, p := range paths {
				opts.Paths = append(opts.Paths, bench.Path(strings.TrimSpace(p)))
			}
			opts.SkipPolling = !polling
			opts.Progress = g.stderr
			if quiet {
				opts.Progress = io.Discard
			}
			opts.Logger = zerolog.Nop()
			if verbose {
				log, err := g.logger()
				if err != nil {
					return err
				}
				opts.Logger = log
			}
			rep, err := bench.Run(cmd.Context(), opts)
			if err != nil {
				return err
			}
			if asJSON {
				return writeJSON(g.stdout, rep)
			}
			return rep.WriteText(g.stdout)
		},
	}
	f := cmd.Flags()
	f.IntSliceVar(&opts.Agents, "agents", []int{1, 100, 1000}, "fleet sizes, run in order")
	f.IntVar(&opts.Flips, "flips", 20, "flips (and floor rounds) per fleet size")
	f.DurationVar(&opts.PollInterval, "poll-interval", time.Second, "the polling baseline's interval")
	f.IntVar(&opts.AgentsPerConn, "agents-per-conn", 50, "agents (and floor responders) sharing one AMQP connection")
	f.DurationVar(&opts.Heartbeat, "heartbeat", 3*time.Second, "the agents' heartbeat interval")
	f.DurationVar(&opts.Lease, "lease", broadcaster.DefaultLeaseDuration, "the broadcaster's lease (at least twice --heartbeat and the agents' lease margin)")
	f.DurationVar(&opts.BeaconInterval, "beacon-interval", broadcaster.DefaultBeaconInterval, "the broadcaster's beacon interval (agents without a DB start on the first beacon)")
	f.StringSliceVar(&paths, "paths", []string{string(bench.PathDB), string(bench.PathDBRead), string(bench.PathNoDB)},
		"agent paths to measure: db (with a DB, signed states applied on the signature), dbread (with a DB, the store read for every state), nodb")
	f.StringVar(&opts.StatusQueueType, "status-queue-type", amqpx.StatusQueueClassic, "type of the status queue, and of the floor's reply queue: classic or quorum")
	f.IntVar(&opts.DBConns, "db-conns", 20, "database connections shared by the agents, and by the pollers")
	f.StringVar(&opts.AckWatch, "ack-watch", "hook", "how acks are timed: hook (the broadcaster's commit) or poll (count in the store every 1ms)")
	f.BoolVar(&polling, "polling", true, "also measure the polling baseline (one poller per agent)")
	f.BoolVar(&opts.Cost, "cost", true, "also measure sustained flips/s, status intake")
	f.IntVar(&opts.CostAgents, "cost-agents", 100, "fleet size of the cost measurements")
	f.DurationVar(&opts.CostDuration, "cost-duration", 3*time.Second, "length of each sustained-rate measurement")
	f.StringVar(&opts.ChartDir, "chart", "", "write an SVG chart per fleet size into this directory")
	f.BoolVar(&asJSON, "json", false, "print the report as JSON")
	f.StringVar(&opts.ProfileDir, "profile", "", "write a CPU profile of each measured phase into this directory (go tool pprof)")
	f.BoolVar(&verbose, "verbose", false, "show the components' logs on stderr")
	f.BoolVar(&quiet, "quiet", false, "no progress lines on stderr")
	return cmd
}
