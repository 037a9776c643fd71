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
		Short: "Run the whole thing on real servers: a broadcaster, N services with live workers, one release from expand to complete",
		Long: `Starts a broadcaster and N instances of the novalike example service (each
with an embedded agent and live workers) in this process, then drives a real
release through expand → migrate (with a backfill) → contract → complete
while the workers keep reading and writing. Prints a timeline and a summary.
Exits 0 only if the removed columns are gone and not one query failed.

It uses schemas and AMQP names of its own and removes them afterwards.`,
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
	cmd.Flags().BoolVar(&verbose, "verbose", false, "show the components' logs on stderr")
	return cmd
}
