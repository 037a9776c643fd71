package schema

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"
	"github.com/rs/zerolog"

	"github.com/phasecast/phasecast/internal/config"
	"github.com/phasecast/phasecast/internal/shellcmd"
)

// Errors of a contract run whose DDL is the team's own command
// (ContractOptions.Exec). The release stays in contracting after each.
var (
	// ErrExecFailed: the command did not exit with status 0.
	ErrExecFailed = errors.New("the contract command failed")
	// ErrExecIncomplete: the command exited 0 but left removed columns or
	// tables in place.
	ErrExecIncomplete = errors.New("the contract command left removed columns or tables in place")
)

// Outcomes of a contract run with ContractOptions.Exec.
const (
	OutcomeExecFailed     = "exec_failed"     // the command failed; run again
	OutcomeExecIncomplete = "exec_incomplete" // the command exited 0 but left removals in place; run again
)

// Environment the contract command runs with, besides the runner's own.
const (
	ExecEnvRelease = "PHASECAST_RELEASE" // the release being contracted
	ExecEnvEpoch   = "PHASECAST_EPOCH"   // the contract epoch every live agent acknowledged
	// The database URL, under phasecast's name and the name most tools
	// read.
	ExecEnvDatabaseURL      = config.EnvDatabaseURL
	ExecEnvDatabaseURLPlain = "DATABASE_URL"
)

// ExecOutputPrefix starts each line of the command's output.
const ExecOutputPrefix = "exec| "

// ExecSpec is the team's own contract tool, run in place of the runner's
// DDL: alembic upgrade contract@head, neutron-db-manage upgrade
// --contract, pgroll complete.
type ExecSpec struct {
	// Command is run with sh -c, in a process group of its own, once the
	// release is in contracting. A run that stops before complete runs it
	// again, so it must be idempotent. Required.
	Command string
	// DatabaseURL is given to the command as PHASECAST_DATABASE_URL and
	// DATABASE_URL. It is never logged with its password, and its
	// password is masked in the command's output. Defaults to none.
	DatabaseURL string
	// Output receives the command's stdout and stderr, line by line under
	// ExecOutputPrefix. Defaults to io.Discard.
	Output io.Writer
}

// ExecReport is how the contract command ran.
type ExecReport struct {
	Command string `json:"command"` // with the database's password masked

	shellcmd.Result
}

// ExecFailedError: the contract command did not exit with status 0, or
// was killed at the DDL phase's deadline or when the run was stopped.
type ExecFailedError struct {
	Release  string
	Command  string
	ExitCode int    // -1 when a signal ended it or it never started
	Signal   string // the signal that ended it, if one did
	Tail     []string
	Deadline time.Duration // the DDL phase's deadline, when it was passed
	Stopped  bool          // the run was stopped (its ctx ended) while the command ran
	Err      error
}

func (e *ExecFailedError) Error() string {
	how := fmt.Sprintf("exited with status %d", e.ExitCode)
	switch {
	case e.Deadline > 0:
		how = fmt.Sprintf("was killed at the DDL phase's deadline of %s (--ddl-timeout)", e.Deadline)
	case e.Stopped:
		how = "was stopped with the runner"
		if e.Signal != "" {
			how += " (signal " + e.Signal + ")"
		}
	case e.Signal != "":
		how = "was ended by signal " + e.Signal
	case e.ExitCode < 0:
		how = fmt.Sprintf("did not run (%v)", e.Err)
	}
	msg := fmt.Sprintf("release %q: the contract command %s", e.Release, how)
	if n := len(e.Tail); n > 0 {
		msg += fmt.Sprintf("; its last line: %q", e.Tail[n-1])
	}
	return msg + "; the release stays in contracting: fix the cause and run again (the command runs again, so it must be idempotent)"
}

// Unwrap makes a command killed at the deadline a DDL timeout (exit 5).
func (e *ExecFailedError) Unwrap() []error {
	if e.Deadline > 0 {
		return []error{ErrExecFailed, ErrDDLTimeout}
	}
	return []error{ErrExecFailed}
}

// ExecIncompleteError: the contract command exited 0 and left removed
// columns or tables in place.
type ExecIncompleteError struct {
	Release string
	Left    []string // what is still there: `column "app"."t"."name"`, `table "app"."t"`
}

func (e *ExecIncompleteError) Error() string {
	return fmt.Sprintf("release %q: the contract command exited 0 but left %s in place; the release stays in contracting: make the command remove %s, then run again",
		e.Release, strings.Join(e.Left, ", "), map[bool]string{true: "it", false: "them"}[len(e.Left) == 1])
}

func (e *ExecIncompleteError) Unwrap() error { return ErrExecIncomplete }

// presentRemovals lists what of m's removals still exists, each named as
// a Gone would name it once gone.
func presentRemovals(ctx context.Context, q sqlx.QueryerContext, m *Manifest) ([]Gone, error) {
	var out []Gone
	for _, r := range m.Removed {
		present, _, err := removalPresence(ctx, q, r)
		if err != nil {
			return nil, fmt.Errorf("checking %s: %w", r.QuotedTable(), err)
		}
		for _, p := range present {
			if len(r.Columns) == 0 {
				out = append(out, Gone{Removal: r.Key(), Name: p})
			} else {
				out = append(out, Gone{Removal: r.Key(), Column: p, Name: r.QuotedTable() + "." + pq.QuoteIdentifier(p)})
			}
		}
	}
	return out, nil
}

// runExec runs the contract command in place of the DDL: in the DDL phase,
// bounded by opts.DDLTimeout and by ctx, with the runner's lock held on
// conn. It succeeds only if the command exits 0 and every removed column
// and table is gone afterwards. Live agents running code that predates
// the release are looked for before and after the command.
func (s *Store) runExec(ctx context.Context, conn *sqlx.Conn, res *ContractResult, m *Manifest, opts ContractOptions, log zerolog.Logger) error {
	spec := opts.Exec
	res.DDLStart = time.Now()
	defer func() { res.DDLEnd = time.Now() }()
	res.OldCodeDuringDDL = []Agent{}
	if err := s.watchOldCode(ctx, conn, res, log); err != nil {
		return err
	}
	before, err := presentRemovals(ctx, conn, m)
	if err != nil {
		return err
	}
	execCtx, cancel := context.WithDeadline(ctx, res.DDLStart.Add(opts.DDLTimeout))
	defer cancel()
	env := []string{ExecEnvRelease + "=" + res.Release, ExecEnvEpoch + "=" + strconv.FormatInt(res.ContractEpoch, 10)}
	if spec.DatabaseURL != "" {
		env = append(env, ExecEnvDatabaseURL+"="+spec.DatabaseURL, ExecEnvDatabaseURLPlain+"="+spec.DatabaseURL)
	}
	log.Info().Str("exec", res.ExecCommand).Int64("epoch", res.ContractEpoch).Str("database_url", config.Redact(spec.DatabaseURL)).
		Msg("running the contract command in place of the DDL")
	res.Attempts++
	ran, runErr := shellcmd.Run(execCtx, shellcmd.Spec{
		Command: spec.Command, Env: env, Output: spec.Output, Prefix: ExecOutputPrefix,
		Redact: config.Secrets(spec.DatabaseURL),
	})
	res.Exec = &ExecReport{Command: res.ExecCommand, Result: ran}
	log.Info().Int("exit_code", ran.ExitCode).Str("signal", ran.Signal).Dur("duration", ran.Duration).Msg("the contract command ended")
	if err := s.watchOldCode(ctx, conn, res, log); err != nil {
		log.Warn().Err(err).Msg("reading the agents after the contract command failed")
	}
	if runErr != nil {
		failed := &ExecFailedError{Release: res.Release, Command: res.ExecCommand, ExitCode: ran.ExitCode, Signal: ran.Signal, Tail: ran.Tail, Err: runErr}
		switch {
		case ctx.Err() != nil:
			failed.Stopped = true
		case errors.Is(execCtx.Err(), context.DeadlineExceeded):
			failed.Deadline = opts.DDLTimeout
		}
		return failed
	}
	after, err := presentRemovals(ctx, conn, m)
	if err != nil {
		return err
	}
	for _, b := range before {
		if !slices.Contains(after, b) {
			res.Dropped = append(res.Dropped, b.Name)
		}
	}
	if len(after) > 0 {
		left := make([]string, len(after))
		for i, a := range after {
			left[i] = a.Object()
		}
		return &ExecIncompleteError{Release: res.Release, Left: left}
	}
	return nil
}
