package cli

import (
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/phasecast/phasecast/schema"
)

func init() { extraCommands = append(extraCommands, newContractCmd) }

func newContractCmd(g *globals) *cobra.Command {
	var (
		opts        schema.ContractOptions
		asJSON      bool
		execCommand string
	)
	cmd := &cobra.Command{
		Use:   "contract RELEASE",
		Short: "Wait until every live agent has acknowledged RELEASE's contract, then drop its removed columns",
		Long: `Runs the contract of RELEASE, which must be in phase contract:

  1. re-checks the preconditions (exit 3) and the safety checks (exit 4), and
     refuses when no broadcaster has been alive recently;
  2. waits until every agent with an unexpired lease has drained the contract
     flip's epoch, and runs code built for RELEASE (exit 2 on --timeout, with
     the missing agents named; nothing is dropped);
  3. lists database sessions that belong to no agent and could touch the
     removed tables: their role may use them, they hold a lock on them, or
     their query names them (--strict refuses; --pooler names poolers);
  4. takes the release to contracting and runs the DDL with a short
     lock_timeout (--lock-timeout, 50ms), trying only while no transaction
     open longer than that holds a lock on the table (it looks in pg_locks
     first) and retrying on lock timeouts, so the DROP never queues in
     front of live traffic, until --ddl-timeout (exit 5, the release stays
     in contracting); a removed table or column that is already gone counts
     as done; each statement lists the dependents again under its lock and
     refuses (exit 4) if one is not in the plan; agents running code that
     predates RELEASE that appear meanwhile are reported;
  5. marks the release complete.

Re-running is safe at every step: after a crash, run the same command again.
A release a runner took to contracting resumes at the DDL (step 4). One in
contracting that no runner took there (a 'flip RELEASE contracting' by an
older binary) is refused, since nothing says its agents acknowledged:
--recheck runs steps 1 to 3 on it, as from contract, before dropping.

--exec CMD runs the team's own contract tool in step 4 instead of phasecast's
DDL (alembic upgrade contract@head, neutron-db-manage upgrade --contract,
pgroll complete): through sh -c, in a process group of its own, with
PHASECAST_RELEASE, PHASECAST_EPOCH (the contract epoch every live agent
acknowledged), PHASECAST_DATABASE_URL and DATABASE_URL in its environment,
its output streamed to stderr under "exec| ", bounded by --ddl-timeout
(exit 5) and killed if the runner is stopped. The release is complete only
if CMD exits 0 and every removed column and table is gone; otherwise it
stays in contracting and the error says why (CMD's exit status, or what is
still there). A re-run runs CMD again: it must be idempotent.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			// Logs, the command's output and the final error go through
			// the progress line, so each starts a line of its own.
			stderr := newStatusLine(g.stderr)
			defer stderr.End()
			log, err := g.loggerTo(stderr)
			if err != nil {
				return err
			}
			if cmd.Flags().Changed("exec") {
				if strings.TrimSpace(execCommand) == "" {
					return errors.New("--exec is empty: name the contract command, or leave --exec out for phasecast's own DDL")
				}
				opts.Exec = &schema.ExecSpec{Command: execCommand, DatabaseURL: g.databaseURL, Output: stderr}
			}
			return g.withStore(cmd.Context(), func(store *schema.Store) error {
				opts.Log = log
				if !asJSON && !opts.DryRun {
					opts.Progress = progressPrinter(stderr)
				}
				res, err := store.Contract(cmd.Context(), args[0], opts)
				if asJSON {
					return printContractJSON(g.stdout, res, err)
				}
				if res != nil {
					printContract(g.stdout, res)
				}
				return err
			})
		},
	}
	f := cmd.Flags()
	f.DurationVar(&opts.Timeout, "timeout", 10*time.Minute, "how long to wait for acknowledgements (exit 2 after)")
	f.BoolVar(&opts.DryRun, "dry-run", false, "print the plan (DDL, agents acknowledged and missing, outside sessions) and change nothing")
	f.BoolVar(&opts.Strict, "strict", false, "refuse when database sessions outside any agent are connected")
	f.StringSliceVar(&opts.Poolers, "pooler", nil, "a connection pooler's client address, address range (CIDR) or role: its server sessions are listed as outside only for a query or a lock on a removed table, whatever their application_name (repeatable)")
	f.DurationVar(&opts.LockTimeout, "lock-timeout", schema.DefaultLockTimeout, "lock_timeout of each DROP; tried only while no transaction open this long holds the table, retried on timeout")
	f.DurationVar(&opts.DDLTimeout, "ddl-timeout", 10*time.Minute, "how long the DDL may keep retrying for its locks (exit 5 after; the release stays in contracting)")
	f.DurationVar(&opts.LeaderWithin, "broadcaster-within", 15*time.Second, "refuse unless a leading broadcaster was alive this recently")
	f.StringVar(&opts.Actor, "actor", defaultActor(), "who runs the contract, for the audit log")
	f.BoolVar(&opts.Recheck, "recheck", false, "take a release that no runner took to contracting: check and wait for acknowledgements as from contract, then drop")
	f.StringVar(&execCommand, "exec", "", "run this command (with sh -c) in place of phasecast's DDL, once in contracting; it runs again on a re-run, so it must be idempotent")
	f.BoolVar(&asJSON, "json", false, "print one JSON document at the end")
	return cmd
}

// progressPrinter shows live progress: one line redrawn in place on a
// terminal, plain lines when something changes elsewhere.
func progressPrinter(w *statusLine) func(schema.Progress) {
	last := ""
	var lastPrinted time.Time
	return func(p schema.Progress) {
		line := fmt.Sprintf("waiting for acknowledgements of %s (epoch %d): %d/%d live agents acknowledged, %s elapsed",
			p.Release, p.ContractEpoch, p.Acked, p.Live, p.Elapsed.Round(100*time.Millisecond))
		if missing := describeMissing(p.Missing, p.OldCode); missing != "" {
			line += "; missing: " + missing
		}
		if w.tty {
			w.Redraw(line)
			return
		}
		// Elsewhere, one line per change, and a reminder every 10 s.
		key := fmt.Sprint(p.Acked, p.Live, describeMissing(p.Missing, p.OldCode))
		if key != last || time.Since(lastPrinted) >= 10*time.Second {
			w.Redraw(line)
			last, lastPrinted = key, time.Now()
		}
	}
}

func describeMissing(missing, oldCode []schema.Agent) string {
	var parts []string
	for _, a := range missing {
		if note := a.ConflictNote(); note != "" {
			parts = append(parts, fmt.Sprintf("%s (%s on %s/%d: %s)", a.ID, a.Service, a.Host, a.PID, note))
			continue
		}
		parts = append(parts, fmt.Sprintf("%s (%s on %s/%d)", a.ID, a.Service, a.Host, a.PID))
	}
	for _, a := range oldCode {
		parts = append(parts, fmt.Sprintf("%s (%s on %s/%d, version %q: code predates the release)", a.ID, a.Service, a.Host, a.PID, a.Version))
	}
	const most = 5
	if len(parts) > most {
		parts = append(parts[:most], fmt.Sprintf("and %d more", len(parts)-most))
	}
	return strings.Join(parts, ", ")
}

func printContract(w io.Writer, res *schema.ContractResult) {
	fmt.Fprintf(w, "\nrelease %s: %s\n", res.Release, res.Outcome)
	if res.ExecCommand != "" {
		fmt.Fprintf(w, "contract command, in place of the DDL: %s\n", res.ExecCommand)
		if e := res.Exec; e != nil {
			how := fmt.Sprintf("exit status %d", e.ExitCode)
			if e.Signal != "" {
				how = "ended by signal " + e.Signal
			}
			fmt.Fprintf(w, "  ran for %s: %s\n", e.Duration.Round(time.Millisecond), how)
		}
	} else if len(res.DDL) > 0 {
		fmt.Fprintln(w, "DDL:")
		for _, s := range res.DDL {
			fmt.Fprintf(w, "  %s;\n", s)
		}
	}
	for _, g := range res.AlreadyGone {
		fmt.Fprintf(w, "already gone, counts as done: %s\n", g.Object())
	}
	for _, d := range res.Dependents {
		if d.Cascade {
			fmt.Fprintf(w, "goes with CASCADE: %s\n", d.Object())
		} else {
			fmt.Fprintf(w, "depends on a removed column: %s\n", d.Object())
		}
	}
	fmt.Fprintf(w, "agents: %d acknowledged, %d missing, %d running code that predates %s\n", len(res.Acked), len(res.Missing), len(res.OldCode), res.Release)
	if m := describeMissing(res.Missing, res.OldCode); m != "" {
		fmt.Fprintf(w, "  waiting for: %s\n", m)
	}
	if len(res.OldCodeDuringDDL) > 0 {
		fmt.Fprintf(w, "appeared during the DDL, running code that predates %s: %s\n", res.Release, describeMissing(nil, res.OldCodeDuringDDL))
	}
	for _, s := range res.OutsideSessions {
		mark := ""
		if s.NamesRemoved {
			mark = " NAMES A REMOVED COLUMN"
		}
		fmt.Fprintf(w, "outside session: pid %d, application %q, user %s, %s%s: %s\n", s.PID, s.ApplicationName, s.User, s.State, mark, s.Query)
		if len(s.Reasons) > 0 {
			fmt.Fprintf(w, "  listed because %s\n", strings.Join(s.Reasons, "; "))
		}
	}
	for _, p := range res.Problems {
		fmt.Fprintf(w, "problem: %s\n", p.Detail)
		if p.Fix != "" {
			fmt.Fprintf(w, "  fix: add to expand: %s\n", p.Fix)
		}
	}
	if len(res.Dropped) > 0 && res.Exec != nil {
		fmt.Fprintf(w, "dropped by the contract command: %s (waited %s for acknowledgements)\n", strings.Join(res.Dropped, ", "), res.Waited.Round(time.Millisecond))
	} else if len(res.Dropped) > 0 {
		fmt.Fprintf(w, "dropped: %s (%d DDL attempt(s), waited %s for acknowledgements)\n", strings.Join(res.Dropped, ", "), res.Attempts, res.Waited.Round(time.Millisecond))
	}
}

// contractJSON is the one document --json prints, success or not.
type contractJSON struct {
	*schema.ContractResult
	Error    string `json:"error,omitempty"`
	ExitCode int    `json:"exit_code"`
}

func printContractJSON(w io.Writer, res *schema.ContractResult, err error) error {
	doc := contractJSON{ContractResult: res, ExitCode: exitCode(err)}
	if err != nil {
		doc.Error = oneLine(err.Error())
	}
	if doc.ContractResult == nil {
		doc.ContractResult = &schema.ContractResult{}
	}
	if werr := writeJSON(w, doc); werr != nil {
		return errors.Join(err, werr)
	}
	return err
}
