package cli

import (
	"github.com/rs/zerolog"
	"github.com/spf13/cobra"

	"github.com/phasecast/phasecast/cmd/phasecast/internal/demo"
)

func init() { extraCommands = append(extraCommands, newDemoCmd) }

func newDemoCmd(g *globals) *cobra.Command {
	var opts demo.Options
	var verbose bool
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Run the whole thing on real servers, without the gate and then with phasecast, and compare",
		Long: `Runs one release twice on real servers, each time with a broadcaster and N
instances of the novalike example service (each with an embedded agent and
live workers) in this process, through expand → migrate (with a backfill) →
contract while the workers keep reading and writing.

First without the gate: the flip to contract is followed at once by the
DROP, as a hurried script would do it, and the queries that fail are
counted. Then with phasecast: the contract runner drops only once every
agent acknowledged. Prints both timelines and the two runs side by side
(queries run, failed, the first error). Exits 0 only if the phasecast run
dropped the columns and not one of its queries failed; the first run is
reported, not judged.

With --python N, each run's fleet also has N instances of the Python
example service (python/examples/novalike.py, each a process of its own
embedding the Python agent) beside the Go ones, under the same broadcaster
and runner; the summary shows their queries and failures. They run on
Debian's /usr/bin/python3 with its packages (apt-get install -y
python3-kombu python3-psycopg2 python3-cryptography python3-sqlalchemy),
from the repository's python/ directory (found from the working directory
up); without them the demo refuses at once and says what to install.

Each run uses schemas and AMQP names of its own and removes them afterwards.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			opts.DatabaseURL, opts.AMQPURL, opts.Out = g.databaseURL, g.amqpURL, g.stdout
			opts.Logger = zerolog.Nop()
			if verbose {
				log, err := g.logger()
				if err != nil {
					return err
				}
				opts.Logger = log
			}
			_, err := demo.Run(cmd.Context(), opts)
			return err
		},
	}
	cmd.Flags().IntVar(&opts.Agents, "agents", 20, "service instances, each with its own agent")
	cmd.Flags().IntVar(&opts.Workers, "workers", 2, "workers per instance")
	cmd.Flags().IntVar(&opts.Python, "python", 0, "also run N instances of the Python example service (Debian's python3 and its packages)")
	cmd.Flags().BoolVar(&verbose, "verbose", false, "show the components' logs on stderr")
	return cmd
}
