package cli

import (
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/schema"
)

func newMigrateCmd(g *globals) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "migrate",
		Short: "Create or upgrade phasecast's own tables (safe to run concurrently and repeatedly)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return g.withStore(cmd.Context(), func(store *schema.Store) error {
				res, err := store.Migrate(cmd.Context())
				if err != nil {
					return err
				}
				if asJSON {
					return writeJSON(g.stdout, res)
				}
				if len(res.Applied) == 0 {
					fmt.Fprintf(g.stdout, "schema %q is up to date (version %d)\n", store.Schema(), res.Current)
					return nil
				}
				fmt.Fprintf(g.stdout, "schema %q migrated to version %d (applied %v)\n", store.Schema(), res.Current, res.Applied)
				return nil
			})
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the result as JSON")
	return cmd
}

func newReleaseCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "release",
		Short: "Register releases from manifests",
	}
	var (
		asJSON bool
		actor  string
	)
	apply := &cobra.Command{
		Use:   "apply FILE",
		Short: "Register a release in expand and run its expand SQL, in one transaction",
		Long: `Registers the release described by the manifest FILE in phase expand and runs its
expand statements, all in one transaction. Re-applying an identical manifest
is a no-op. A changed manifest is accepted only while the release is still in
expand.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			m, err := schema.LoadManifest(args[0])
			if err != nil {
				return err
			}
			return g.withStore(cmd.Context(), func(store *schema.Store) error {
				res, err := store.ApplyRelease(cmd.Context(), m, actor)
				if err != nil {
					return fmt.Errorf("release %q: %w", m.Release, err)
				}
				if asJSON {
					return writeJSON(g.stdout, res)
				}
				switch {
				case res.Unchanged:
					fmt.Fprintf(g.stdout, "release %s unchanged (phase %s, epoch %d)\n", res.Release, res.Phase, res.Epoch)
				case res.Updated:
					fmt.Fprintf(g.stdout, "release %s updated in expand (epoch %d)\n", res.Release, res.Epoch)
				default:
					fmt.Fprintf(g.stdout, "release %s registered in expand (epoch %d)\n", res.Release, res.Epoch)
				}
				return nil
			})
		},
	}
	apply.Flags().BoolVar(&asJSON, "json", false, "print the result as JSON")
	apply.Flags().StringVar(&actor, "actor", defaultActor(), "who is applying, for the audit log")
	cmd.AddCommand(apply)
	return cmd
}

// flipFlags are shared by flip and rollback.
type flipFlags struct {
	asJSON bool
	actor  string
	note   string
}

func (f *flipFlags) register(cmd *cobra.Command) {
	cmd.Flags().BoolVar(&f.asJSON, "json", false, "print the result as JSON")
	cmd.Flags().StringVar(&f.actor, "actor", defaultActor(), "who is flipping, for the audit log")
	cmd.Flags().StringVar(&f.note, "note", "", "a note for the audit log")
}

func (f *flipFlags) print(w io.Writer, res schema.FlipResult) error {
	if f.asJSON {
		return writeJSON(w, res)
	}
	_, err := fmt.Fprintf(w, "release %s: %s → %s (epoch %d)\n", res.Release, res.From, res.To, res.Epoch)
	return err
}

func newFlipCmd(g *globals) *cobra.Command {
	var (
		f     flipFlags
		force bool
	)
	cmd := &cobra.Command{
		Use:   "flip RELEASE PHASE",
		Short: "Move a release to its next phase (migrate, contract)",
		Long: `Moves RELEASE to PHASE. Allowed moves: expand → migrate → contract, and the
rollback contract → migrate. contracting and complete are refused: only
'phasecast contract RELEASE' enters them, after its checks and the wait for
every live agent's acknowledgement. Every accepted flip bumps the global
epoch and is published to every agent.

Flipping to contract first runs the release's preconditions (exit 3 if one
returns a row) and the safety checks: removed columns that are NOT NULL with
no default, objects that depend on removed columns, and live agents running
code that predates the release (exit 4; --force overrides only the last).
Each object that a removal with cascade: true will drop is named on stderr,
as is each removed table or column that is already gone.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			to, err := phase.Parse(args[1])
			if err != nil {
				return err
			}
			return g.withStore(cmd.Context(), func(store *schema.Store) error {
				opts := schema.FlipOptions{Actor: f.actor, Note: f.note}
				if to == phase.Contract {
					opts.Check = store.ContractCheck(schema.ContractCheckOptions{
						Force: force,
						Warn: func(p schema.Problem) {
							fmt.Fprintf(g.stderr, "warning: %s\n", p.Detail)
						},
						Gone: func(gone schema.Gone) {
							fmt.Fprintf(g.stderr, "note: %s of removal %s is already gone: that part counts as done\n", gone.Object(), gone.Removal)
						},
						Cascaded: func(d schema.Dependent) {
							fmt.Fprintf(g.stderr, "note: %s depends on removal %s, which says cascade: true: the contract drops it too\n", d.Object(), d.Removal)
						},
					})
				}
				res, err := store.Flip(cmd.Context(), args[0], to, opts)
				if err != nil {
					return err
				}
				return f.print(g.stdout, res)
			})
		},
	}
	f.register(cmd)
	cmd.Flags().BoolVar(&force, "force", false, "flip to contract even though live agents run code that predates the release")
	return cmd
}

func newRollbackCmd(g *globals) *cobra.Command {
	var f flipFlags
	cmd := &cobra.Command{
		Use:   "rollback RELEASE",
		Short: "Move a release from contract back to migrate (refused once a runner has started)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.withStore(cmd.Context(), func(store *schema.Store) error {
				res, err := store.Rollback(cmd.Context(), args[0], schema.FlipOptions{Actor: f.actor, Note: f.note})
				if err != nil {
					return err
				}
				return f.print(g.stdout, res)
			})
		},
	}
	f.register(cmd)
	return cmd
}

func newStatusCmd(g *globals) *cobra.Command {
	var (
		asJSON bool
		flips  int
		watch  bool
		wopts  watchOptions
	)
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show releases, phases, the epoch, agents, broadcasters and recent flips",
		Long: `Shows releases, phases and removals, the epoch, every agent with its epochs,
lease and acknowledgements, broadcasters and recent flips.

--watch keeps a live fleet view until interrupted: each release's phase, each
agent's standing in every pending contract (acknowledged, draining with guards
open, behind, old code, fenced, expired), who leads and the last flips. It
redraws at once on every flip (LISTEN) and every --refresh for agent statuses
and lease expiry, which send no notification. On a terminal it redraws in
place; elsewhere it writes the view as plain lines each time it changes.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if watch && asJSON {
				return errors.New("--watch and --json do not go together: poll 'phasecast status --json' instead")
			}
			if !watch && cmd.Flags().Changed("refresh") {
				return errors.New("--refresh goes with --watch")
			}
			if watch && wopts.refresh < 10*time.Millisecond {
				return fmt.Errorf("--refresh is %s: it must be at least 10ms", wopts.refresh)
			}
			return g.withStore(cmd.Context(), func(store *schema.Store) error {
				if watch {
					log, err := g.logger()
					if err != nil {
						return err
					}
					wopts.flips = flips
					return g.watchStatus(cmd.Context(), store, g.stdout, wopts, log)
				}
				rep, err := store.Report(cmd.Context(), flips)
				if err != nil {
					return err
				}
				if asJSON {
					return writeJSON(g.stdout, rep)
				}
				return printReport(g.stdout, rep)
			})
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the report as JSON")
	cmd.Flags().IntVar(&flips, "flips", 10, "how many recent flips to show")
	cmd.Flags().BoolVar(&watch, "watch", false, "keep a live fleet view, redrawn on every change, until interrupted")
	cmd.Flags().DurationVar(&wopts.refresh, "refresh", time.Second, "with --watch: how often agents and leases are re-read between flips")
	return cmd
}

func printReport(out io.Writer, rep *schema.Report) error {
	w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintf(w, "schema %s", rep.Schema)
	if rep.StoreID != "" {
		fmt.Fprintf(w, ", store %s", rep.StoreID)
	}
	fmt.Fprintf(w, ", epoch %d", rep.Epoch)
	if rep.Unpublished > 0 {
		fmt.Fprintf(w, " (changes up to epoch %d not yet published: is a broadcaster running?)", rep.Unpublished)
	}
	fmt.Fprintln(w)
	if rep.StoreVersion < rep.Version {
		fmt.Fprintf(w, "store schema version %d, this binary's %d: changes refuse until 'phasecast migrate' runs\n", rep.StoreVersion, rep.Version)
	}

	fmt.Fprintln(w, "\nRELEASE\tPHASE\tEPOCH\tREMOVED")
	if len(rep.Releases) == 0 {
		fmt.Fprintln(w, "(none)")
	}
	for _, r := range rep.Releases {
		fmt.Fprintf(w, "%s\t%s\t%d\t%s\n", r.Name, r.Phase, r.PhaseEpoch, describeRemovals(r.Removed))
	}
	for _, r := range rep.Releases {
		switch {
		case r.Phase != phase.Contracting:
		case r.HeldBy != "":
			fmt.Fprintf(w, "CONTRACTING %s: held by %s; should that run have stopped, 'phasecast contract %s' resumes at the DDL\n", r.Name, r.HeldBy, r.Name)
		case rep.StoreVersion >= rep.Version:
			// Only a store with contracting_by can say no runner holds it.
			fmt.Fprintf(w, "CONTRACTING %s: no contract runner took it there; 'phasecast contract %s --recheck' checks and waits before dropping\n", r.Name, r.Name)
		}
	}

	fmt.Fprintln(w, "\nAGENT\tSERVICE\tHOST/PID\tAPPLIED\tDRAINED\tLEASE\tKNOWS\tACKED CONTRACT\tVOUCHED BY")
	if len(rep.Agents) == 0 {
		fmt.Fprintln(w, "(none)")
	}
	for _, a := range rep.Agents {
		lease := "expired"
		if a.Live() {
			lease = (time.Duration(a.LeaseRemainingMS) * time.Millisecond).Round(100 * time.Millisecond).String()
		}
		vouched := a.VouchedBy
		if vouched == "" {
			vouched = "-" // enrolled by a broadcaster run with --insecure, or before per-agent identity
		}
		fmt.Fprintf(w, "%s\t%s\t%s/%d\t%d\t%d\t%s\t%s\t%s\t%s\n", a.ID, a.Service, a.Host, a.PID,
			a.AppliedEpoch, a.DrainedEpoch, lease, strings.Join(a.Releases, ","), ackedContracts(a, rep.Releases), vouched)
	}
	for _, a := range rep.Agents {
		if note := a.ConflictNote(); note != "" {
			fmt.Fprintf(w, "CONFLICT %s: %s\n", a.ID, note)
		}
	}

	fmt.Fprintln(w, "\nBROADCASTER\tHOST/PID\tROLE\tLAST SEEN")
	if len(rep.Broadcasters) == 0 {
		fmt.Fprintln(w, "(none)")
	}
	for _, b := range rep.Broadcasters {
		role := "standby"
		if b.Leader {
			role = "leader"
		}
		fmt.Fprintf(w, "%s\t%s/%d\t%s\t%s\n", b.ID, b.Host, b.PID, role, b.LastSeen.Format(time.RFC3339))
	}

	fmt.Fprintln(w, "\nAT\tRELEASE\tFLIP\tEPOCH\tACTOR")
	for _, f := range rep.RecentFlips {
		from := "(new)"
		if f.FromPhase != nil {
			from = *f.FromPhase
		}
		fmt.Fprintf(w, "%s\t%s\t%s → %s\t%d\t%s\n", f.At.Format(time.RFC3339), f.Release, from, f.ToPhase, f.Epoch, f.Actor)
	}
	return w.Flush()
}

func describeRemovals(rs []schema.Removal) string {
	if len(rs) == 0 {
		return "-"
	}
	parts := make([]string, len(rs))
	for i, r := range rs {
		if len(r.Columns) == 0 {
			parts[i] = r.Key() + " (table)"
		} else {
			parts[i] = r.Key() + "." + strings.Join(r.Columns, ",")
		}
	}
	return strings.Join(parts, "; ")
}

// ackedContracts says, for each release waiting in contract, whether the
// agent has acknowledged its flip: "L:yes", "L:no", "L:old code", or
// "L:no (ID conflict)" while two live processes claim the agent's ID.
func ackedContracts(a schema.Agent, releases []schema.ReleaseStatus) string {
	var parts []string
	for _, r := range releases {
		if r.Phase != phase.Contract || r.ContractEpoch == nil {
			continue
		}
		switch {
		case !a.Knows(r.Name):
			parts = append(parts, r.Name+":old code")
		case a.Conflicted():
			parts = append(parts, r.Name+":no (ID conflict)")
		case a.Acked(r.Name, *r.ContractEpoch):
			parts = append(parts, r.Name+":yes")
		default:
			parts = append(parts, r.Name+":no")
		}
	}
	if len(parts) == 0 {
		return "-"
	}
	return strings.Join(parts, " ")
}
