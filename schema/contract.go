package schema

import (
	"context"
	"database/sql/driver"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"
	"github.com/rs/zerolog"

	"github.com/phasecast/phasecast/internal/config"
	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/retry"
	"github.com/phasecast/phasecast/internal/shellcmd"
)

// Contract runner errors callers branch on.
var (
	// ErrAckTimeout: not every live agent acknowledged in time. Nothing was
	// dropped and the release is unchanged.
	ErrAckTimeout = errors.New("timed out waiting for acknowledgements")
	// ErrNoBroadcaster: no leading broadcaster is alive, so agents cannot
	// hear of the contract and "no agents are missing" would mean nothing.
	ErrNoBroadcaster = errors.New("no leading broadcaster is alive")
	// ErrOutsideSessions: Strict is set and database sessions that no live
	// agent vouches for are connected.
	ErrOutsideSessions = errors.New("sessions outside any agent are connected")
	// ErrRunnerBusy: another contract runner holds the release.
	ErrRunnerBusy = errors.New("another contract runner holds the release")
	// ErrDDLTimeout: the DDL could not take its locks before
	// ContractOptions.DDLTimeout ran out. The release stays in contracting;
	// what was not dropped is still in place.
	ErrDDLTimeout = errors.New("timed out running the DDL")
	// ErrContractingUnverified: the release is in contracting but no
	// contract runner took it there (a flip by an older binary), so nothing
	// says every live agent acknowledged it. Nothing was dropped; Recheck
	// makes the run check and wait as from contract.
	ErrContractingUnverified = errors.New("no contract runner took the release to contracting")
)

// Outcomes of a contract run.
const (
	OutcomeComplete        = "complete"         // the DDL ran and the release is complete
	OutcomeAlreadyComplete = "already_complete" // nothing to do
	OutcomeDryRun          = "dry_run"          // plan only, nothing changed
	OutcomeTimeout         = "timeout"          // acks did not all arrive; nothing dropped
	OutcomeRefused         = "refused"          // a check failed; nothing changed
	OutcomeFailed          = "failed"           // an error after contracting began; run again
	OutcomeDDLTimeout      = "ddl_timeout"      // the DDL could not take its locks in time; run again
)

// DefaultLockTimeout is ContractOptions.LockTimeout's default: reads of
// the table stall at most about this long behind a try of the DROP.
const DefaultLockTimeout = 50 * time.Millisecond

// ContractOptions tune a contract run.
type ContractOptions struct {
	// Timeout bounds the wait for acknowledgements. Defaults to 10m.
	Timeout time.Duration
	// DryRun computes the plan once and changes nothing. Defaults to false.
	DryRun bool
	// Strict refuses when sessions outside any agent are connected, instead
	// of warning. Defaults to false.
	Strict bool
	// Poolers names connection poolers' client addresses (an IP address
	// or a CIDR range) and roles. A session from one is a pooled server
	// session that no single client owns: it is listed only for its query
	// naming a removed table or column or a lock on a table removed whole,
	// whatever its application_name says, or for a lock on a table losing
	// columns under no live agent's application_name. Defaults to none.
	Poolers []string
	// LockTimeout is the lock_timeout of each DDL statement, so it never
	// queues for long in front of live traffic, whose queries on the table
	// wait behind it. Before each try the runner looks in pg_locks and
	// holds off while another session holding a lock on the table has had
	// its transaction open for the lock_timeout or more; it tries when the
	// holders are only younger ones, and retries a timed-out try after a
	// short backoff. A stream of transactions that keeps the table locked
	// (4 tries in a row timed out, or 3 old holders ended while others
	// took their place) doubles the lock_timeout, up to 2s, so it cannot
	// starve the DROP. Defaults to 50ms (DefaultLockTimeout).
	LockTimeout time.Duration
	// DDLTimeout bounds the DDL phase, which begins once the release is in
	// contracting: lock-timeout retries stop when it has passed (after at
	// most one more attempt) and the run fails with ErrDDLTimeout, leaving
	// the release in contracting to run again. While the DDL retries, old
	// code that registers cannot be waited for, only reported, so this
	// keeps that window bounded. (DESIGN.md retries without end; README,
	// "Design notes".) Defaults to 10m.
	DDLTimeout time.Duration
	// PollInterval is how often the agents are read while waiting. Defaults
	// to 250ms.
	PollInterval time.Duration
	// LeaderWithin is how recently a leading broadcaster must have written
	// its liveness; if none has but one is alive, the runner gives it up
	// to 5s (at most LeaderWithin) to lead again. Defaults to 15s.
	LeaderWithin time.Duration
	// Actor is recorded in the audit log, and in the runner's identity on
	// the release when it enters contracting. Defaults to "contract
	// runner".
	Actor string
	// Recheck lets the run take a release found in contracting that no
	// contract runner took there (ErrContractingUnverified): it then runs
	// the preconditions, the safety checks, the broadcaster check and the
	// wait for acknowledgements, as from contract, before it drops.
	// Defaults to false: such a release is refused.
	Recheck bool
	// Progress, when set, is called on each poll while waiting. Defaults to
	// none.
	Progress func(Progress)
	// Log receives the runner's log lines. Defaults to a disabled logger.
	Log zerolog.Logger
	// BeforeDDL, when set, is called once the release is in contracting
	// and before the DDL; an error stops the run there, as a crash would.
	// For tests. Defaults to none.
	BeforeDDL func() error
	// Exec, when set, runs the team's own contract tool in place of the
	// runner's DDL, once the release is in contracting; the release is
	// complete only if it exits 0 and leaves none of the removed columns
	// and tables. DDLTimeout bounds it; LockTimeout does not apply.
	// Defaults to none: the runner's own DDL.
	Exec *ExecSpec
	// BeforeComplete, when set, is called after the DDL ran and before the
	// release is marked complete; an error stops the run there, as a crash
	// would. For tests. Defaults to none.
	BeforeComplete func() error
}

func (o ContractOptions) withDefaults() (ContractOptions, error) {
	for _, d := range []struct {
		name string
		v    *time.Duration
		def  time.Duration
	}{
		{"Timeout", &o.Timeout, 10 * time.Minute},
		{"LockTimeout", &o.LockTimeout, DefaultLockTimeout},
		{"DDLTimeout", &o.DDLTimeout, 10 * time.Minute},
		{"PollInterval", &o.PollInterval, 250 * time.Millisecond},
		{"LeaderWithin", &o.LeaderWithin, 15 * time.Second},
	} {
		switch {
		case *d.v < 0:
			return o, fmt.Errorf("ContractOptions.%s is negative (%s): leave it zero for the default of %s", d.name, *d.v, d.def)
		case *d.v == 0:
			*d.v = d.def
		}
	}
	if o.LockTimeout < time.Millisecond {
		return o, fmt.Errorf("ContractOptions.LockTimeout is %s: it must be at least 1ms", o.LockTimeout)
	}
	if _, _, err := parsePoolers(o.Poolers); err != nil {
		return o, err
	}
	if o.Actor == "" {
		o.Actor = "contract runner"
	}
	if o.Exec != nil && strings.TrimSpace(o.Exec.Command) == "" {
		return o, errors.New("ContractOptions.Exec.Command is empty: name the contract command, or leave Exec nil for the runner's own DDL")
	}
	return o, nil
}

// Progress is reported on each poll while the runner waits for acks.
type Progress struct {
	Release       string        `json:"release"`
	ContractEpoch int64         `json:"contract_epoch"`
	Elapsed       time.Duration `json:"elapsed"`
	Live          int           `json:"live"`
	Acked         int           `json:"acked"`
	Missing       []Agent       `json:"missing"`
	OldCode       []Agent       `json:"old_code"`
}

// Session is a database session no live agent vouches for.
type Session struct {
	PID             int    `db:"pid" json:"pid"`
	ApplicationName string `db:"application_name" json:"application_name"`
	User            string `db:"usename" json:"user"`
	ClientAddr      string `db:"client_addr" json:"client_addr,omitempty"`
	State           string `db:"state" json:"state"`
	Query           string `db:"query" json:"query"` // truncated to 200 characters
	// NamesRemoved: the session's current or last query names a removed
	// column and its table (a plain, case-insensitive text match).
	NamesRemoved bool `json:"names_removed"`
	// CanUse: the session's role may use a removed table or column (it
	// has a privilege on it and USAGE on its schema).
	CanUse bool `db:"can_use" json:"can_use"`
	// HoldsLock: the session holds or waits for a lock on a removed table.
	HoldsLock bool `db:"holds_lock" json:"holds_lock"`
	// Pooled: the session comes from a pooler named in Poolers.
	Pooled bool `db:"pooled" json:"pooled,omitempty"`
	// Reasons says why the session is listed.
	Reasons []string `json:"reasons"`
}

// Plan is what a contract run does, or would do.
type Plan struct {
	Release         string      `json:"release"`
	Phase           phase.Phase `json:"phase"`
	ContractEpoch   int64       `json:"contract_epoch"`
	DDL             []string    `json:"ddl"`
	Dependents      []Dependent `json:"dependents"`
	Acked           []Agent     `json:"acked"`
	Missing         []Agent     `json:"missing"`
	OldCode         []Agent     `json:"old_code"`
	OutsideSessions []Session   `json:"outside_sessions"`
	Problems        []Problem   `json:"problems"`
	// AlreadyGone lists the removed tables and columns that no longer
	// exist (an earlier run, another release or someone by hand dropped
	// them): their removals count as done.
	AlreadyGone []Gone `json:"already_gone"`
	// OldCodeDuringDDL lists the live agents running code that predates
	// the release seen while the DDL ran. Contracting was entered with
	// none, so each registered since; such code may still name the
	// removed columns and cannot be waited for any more.
	OldCodeDuringDDL []Agent `json:"old_code_during_ddl"`
	// ExecCommand, when set, runs in place of DDL (ContractOptions.Exec).
	ExecCommand string `json:"exec_command,omitempty"`
}

// ContractResult reports a contract run. Times are the runner's clock.
type ContractResult struct {
	Plan
	Outcome string        `json:"outcome"`
	Dropped []string      `json:"dropped"` // the columns and tables this run dropped, quoted
	Waited  time.Duration `json:"waited"`
	// Attempts counts the DDL's rounds for its locks: each looks at
	// pg_locks, then either runs the statement under lock_timeout or holds
	// off, a transaction open too long holding a lock it needs (HeldOff).
	Attempts int       `json:"attempts"`
	HeldOff  int       `json:"held_off"` // rounds of Attempts that held off instead of trying
	AckedAt  time.Time `json:"acked_at,omitzero"`
	DDLStart time.Time `json:"ddl_start,omitzero"`
	DDLEnd   time.Time `json:"ddl_end,omitzero"`
	// Exec is how the contract command ran, when one did.
	Exec *ExecReport `json:"exec,omitempty"`
}

// AckTimeoutError lists the agents the runner was still waiting for.
type AckTimeoutError struct {
	Release       string
	ContractEpoch int64
	Waited        time.Duration
	Missing       []Agent // live, knows the release, has not drained the contract epoch
	OldCode       []Agent // live, runs code that predates the release
}

func (e *AckTimeoutError) Error() string {
	var parts []string
	if len(e.Missing) > 0 {
		parts = append(parts, fmt.Sprintf("%d not acknowledged (%s)", len(e.Missing), describeAgents(e.Missing)))
	}
	if len(e.OldCode) > 0 {
		parts = append(parts, fmt.Sprintf("%d running code that predates %s (%s)", len(e.OldCode), e.Release, describeAgents(e.OldCode)))
	}
	return fmt.Sprintf("release %q: timed out after %s waiting for acknowledgements of epoch %d: %s; nothing was dropped",
		e.Release, e.Waited.Round(time.Millisecond), e.ContractEpoch, strings.Join(parts, "; "))
}

func (e *AckTimeoutError) Unwrap() error { return ErrAckTimeout }

func describeAgents(agents []Agent) string {
	s := make([]string, len(agents))
	for i, a := range agents {
		s[i] = fmt.Sprintf("%s: service %s on %s, pid %d, version %q", a.ID, a.Service, a.Host, a.PID, a.Version)
		if note := a.ConflictNote(); note != "" {
			s[i] += " (" + note + ")"
		}
	}
	return strings.Join(s, ", ")
}

// OutsideSessionsError lists the sessions that made a strict run refuse.
type OutsideSessionsError struct {
	Release  string
	Sessions []Session
}

func (e *OutsideSessionsError) Error() string {
	named := 0
	for _, s := range e.Sessions {
		if s.NamesRemoved {
			named++
		}
	}
	return fmt.Sprintf("release %q: %d database session%s outside any agent (%d naming a removed column), first pid %d application %q: stop them or run without --strict",
		e.Release, len(e.Sessions), plural(len(e.Sessions)), named, e.Sessions[0].PID, e.Sessions[0].ApplicationName)
}

func (e *OutsideSessionsError) Unwrap() error { return ErrOutsideSessions }

// DDLTimeoutError says which statement could not take its lock before the
// DDL phase's deadline, and which old code appeared meanwhile.
type DDLTimeoutError struct {
	Release   string
	Index     int    // the removal's index in the manifest
	Statement string // its DDL
	Timeout   time.Duration
	Waited    time.Duration // since the DDL phase began
	Attempts  int           // DDL rounds of the run (ContractResult.Attempts)
	HeldOff   int           // rounds that held off, an old transaction holding a lock
	Holder    *LockHolder   // the old transaction holding a lock the statement needs, when one was seen last
	OldCode   []Agent       // live agents running code that predates the release, seen during the DDL
}

func (e *DDLTimeoutError) Error() string {
	msg := fmt.Sprintf("release %q: the DDL phase passed its deadline of %s (--ddl-timeout) after %s and %d attempts (%d held off): removed[%d]: %s still could not take its lock within lock_timeout, so a long transaction holds a lock on the table",
		e.Release, e.Timeout, e.Waited.Round(time.Millisecond), e.Attempts, e.HeldOff, e.Index, e.Statement)
	if e.Holder != nil {
		msg += ": " + e.Holder.String()
	}
	msg += ": end it, then run again"
	if len(e.OldCode) > 0 {
		msg += fmt.Sprintf("; %d agent%s running code that predates %s appeared meanwhile (%s)", len(e.OldCode), plural(len(e.OldCode)), e.Release, describeAgents(e.OldCode))
	}
	return msg
}

func (e *DDLTimeoutError) Unwrap() error { return ErrDDLTimeout }

// DependentsChangedError: objects came to depend on a removal after the
// plan listed its dependents. The statement was rolled back, so nothing of
// that removal was dropped.
type DependentsChangedError struct {
	Release string
	Removal string // Removal.Key()
	Cascade bool
	Added   []Dependent // the dependents the plan did not list
}

func (e *DependentsChangedError) Error() string {
	objects := make([]string, len(e.Added))
	for i, d := range e.Added {
		objects[i] = d.Object()
		if d.Column != "" {
			objects[i] += fmt.Sprintf(" (on column %q)", d.Column)
		}
	}
	what := "the DROP would fail or take them silently"
	if e.Cascade {
		what = "CASCADE would drop them too"
	}
	return fmt.Sprintf("release %q: %d object%s came to depend on %s after the plan listed its dependents: %s; %s, so nothing of this removal was dropped: drop or rewrite them, or run 'phasecast contract %s' again to plan with them",
		e.Release, len(e.Added), plural(len(e.Added)), e.Removal, strings.Join(objects, ", "), what, e.Release)
}

// Unwrap makes the refusal an unsafe contract (exit code 4).
func (e *DependentsChangedError) Unwrap() error { return ErrUnsafe }

// errAcksStale is returned by the contracting flip's check when the
// release was flipped to contract again (a rollback and a re-flip) or an
// agent appeared since the wait ended: the runner waits again.
type errAcksStale struct{ epoch int64 }

func (e *errAcksStale) Error() string {
	return fmt.Sprintf("acknowledgements are stale (contract epoch %d)", e.epoch)
}

// Contract runs the contract step of a release (DESIGN.md, "Contract
// runner"): it checks the release is in contract and still safe, waits until
// every live agent has acknowledged the contract flip, moves the release to
// contracting, drops the removed columns and tables with a short
// lock_timeout and retries, and marks the release complete. Re-running is
// safe at every step: a release already complete is reported as such, and
// one left in contracting by a crashed runner resumes at the DDL. The
// runner records its identity on the release as it enters contracting;
// a release in contracting without it (moved there by an older binary) is
// refused with ErrContractingUnverified, or with Recheck checked and
// waited for as if it were in contract.
//
// A dry run reads everything once, changes nothing, and refuses exactly
// when a real run would refuse up front (preconditions, safety, no
// broadcaster, Strict with outside sessions); missing acks are listed, not
// waited for.
//
// Outside sessions are the ones that could touch the removed tables
// (listSessions): their role may use them, or they hold a lock on them,
// or their query names them. Of those, sessions of live agents (told
// apart by application_name) are left out, and so are idle sessions with
// the runner's own application_name, which are taken to be its connection
// pool; sessions from a pooler (ContractOptions.Poolers) are judged by
// their locks and queries alone. Give services and the runner distinct
// application names for an exact list.
//
// The run holds one connection of the store's pool throughout (it carries
// the advisory lock and the DDL) and uses others besides, so the pool must
// allow at least two.
//
// On error the result, when not nil, holds the plan as far as it got.
// Errors: *TransitionError, *PreconditionError, *UnsafeError,
// ErrNoBroadcaster, *AckTimeoutError, *OutsideSessionsError (Strict),
// ErrRunnerBusy, ErrContractingUnverified, *PoolerError
// (ErrTransactionPooler: the store's connections go through a transaction
// pooler, on which the lock cannot be proven held; see SessionLock); once
// in contracting, *DDLTimeoutError and *DependentsChangedError (an
// ErrUnsafe), or with Exec, *ExecFailedError (an ErrDDLTimeout too when
// the command was killed at DDLTimeout) and *ExecIncompleteError; and an
// error releasing the lock, which also closes the lock's connection.
//
// With Exec the team's command runs in place of the DDL, with the same
// lock held and the same waiting and checks before it. A run that stops
// before complete, and every re-run of it, runs the command again.
func (s *Store) Contract(ctx context.Context, release string, opts ContractOptions) (_ *ContractResult, err error) {
	opts, err = opts.withDefaults()
	if err != nil {
		return nil, err
	}
	log := opts.Log.With().Str("release", release).Logger()
	res := &ContractResult{Plan: Plan{Release: release}}
	fail := func(outcome string, err error) (*ContractResult, error) {
		res.Outcome = outcome
		return res, err
	}

	// One dedicated connection carries the session-level advisory lock for
	// the whole run, and the DDL, so that one runner at a time works on a
	// release; the lock goes with the session if the runner dies. The run
	// goes on only while it can prove its session holds the lock
	// (SessionLock), which a transaction pooler's shared sessions cannot.
	conn, err := s.dedicatedConn(ctx)
	if err != nil {
		return nil, notMigrated(err)
	}
	defer conn.Close()
	var lock *SessionLock
	if !opts.DryRun {
		l, locked, lerr := s.TryLockSession(ctx, conn.Conn, "contract:"+release, "the contract lock")
		if lerr != nil {
			Discard(conn.Conn)
			if errors.Is(lerr, ErrTransactionPooler) {
				return fail(OutcomeRefused, fmt.Errorf("release %q: nothing was done: %w", release, lerr))
			}
			return nil, notMigrated(lerr)
		}
		if !locked {
			return fail(OutcomeRefused, fmt.Errorf("%w: release %q is being contracted by another 'phasecast contract'; wait for it to finish", ErrRunnerBusy, release))
		}
		lock = l
		defer func() {
			if uerr := s.unlockContract(lock, log); uerr != nil {
				err = errors.Join(err, uerr)
			}
		}()
	}

	rel, err := s.Release(ctx, release)
	if err != nil {
		return nil, err
	}
	res.Phase = rel.Phase
	switch rel.Phase {
	case phase.Complete:
		res.ContractEpoch = rel.ContractEpoch.Int64
		return fail(OutcomeAlreadyComplete, nil)
	case phase.Contract, phase.Contracting:
	default:
		return fail(OutcomeRefused, &TransitionError{Release: release, From: rel.Phase, To: phase.Contracting,
			Reason: fmt.Sprintf("the contract runner starts from contract: run 'phasecast flip %s contract' first", release)})
	}
	m, err := rel.LoadManifest()
	if err != nil {
		return nil, err
	}
	res.DDL = m.DDL()
	if opts.Exec != nil {
		// Shown and logged: without the database's password, should the
		// command spell it out.
		res.ExecCommand = shellcmd.Mask(opts.Exec.Command, config.Secrets(opts.Exec.DatabaseURL))
	}
	res.ContractEpoch = rel.ContractEpoch.Int64
	runner := runnerIdentity(opts.Actor)
	// Resume at the DDL only what a runner took to contracting: it got
	// there after its checks and every acknowledgement. Anything else in
	// contracting had neither.
	resuming := rel.Phase == phase.Contracting && rel.ContractingBy.Valid
	if rel.Phase == phase.Contracting && !resuming {
		if !opts.Recheck {
			return fail(OutcomeRefused, fmt.Errorf("release %q is in contracting, but %w (a 'flip %s contracting' by an older binary, or such a binary's runner): "+
				"nothing says every live agent acknowledged it, so nothing was dropped; run 'phasecast contract %s --recheck' to run the checks and the wait for every live agent's acknowledgement before dropping",
				release, ErrContractingUnverified, release, release))
		}
		log.Warn().Msg("release is in contracting, but no contract runner took it there; checking and waiting as from contract")
	}

	// Checks that fail fast, before any waiting.
	if !resuming {
		if err := s.CheckPreconditions(ctx, m); err != nil {
			return fail(OutcomeRefused, err)
		}
	}
	problems, deps, err := s.CheckSafety(ctx, s.db, m)
	if err != nil {
		return nil, err
	}
	res.Dependents, res.Problems = deps, problems
	if len(problems) > 0 {
		return fail(OutcomeRefused, &UnsafeError{Release: release, Problems: problems})
	}
	if res.AlreadyGone, err = s.AlreadyGone(ctx, s.db, m); err != nil {
		return nil, err
	}
	for _, g := range res.AlreadyGone {
		log.Info().Str("removal", g.Removal).Str("gone", g.Object()).Msg("already gone: this part of the removal counts as done")
	}
	if !resuming {
		alive, err := s.leaderAlive(ctx, opts)
		if err != nil {
			return nil, err
		}
		if !alive {
			return fail(OutcomeRefused, fmt.Errorf("release %q: %w (none wrote its liveness within %s): start 'phasecast broadcast' so agents hear of the contract and can acknowledge it",
				release, ErrNoBroadcaster, opts.LeaderWithin))
		}
	}

	if resuming {
		// A previous runner crashed after moving the release to
		// contracting. It only gets there after every live agent had
		// acknowledged the contract epoch, and from then on agents never
		// bring the removed columns back (contracting hides them, and an
		// agent that starts now loads that state), so there is nothing to
		// wait for. The DDL is IF EXISTS, so statements that already ran
		// are harmless.
		log.Info().Str("contracting_by", rel.ContractingBy.String).Msg("release is in contracting: a previous run stopped before completing; resuming at the DDL")
		agents, err := s.LiveAgents(ctx)
		if err != nil {
			return nil, err
		}
		res.Acked, res.Missing, res.OldCode = classifyAgents(agents, release, res.ContractEpoch)
		if err := s.listSessions(ctx, conn, res, m, agents, opts); err != nil {
			return nil, err
		}
		if opts.DryRun {
			return fail(OutcomeDryRun, nil)
		}
	} else {
		start := time.Now()
		for {
			agents, err := s.waitForAcks(ctx, conn, lock, res, release, start, opts, log)
			res.Waited = time.Since(start)
			if err != nil {
				var timeout *AckTimeoutError
				if errors.As(err, &timeout) {
					return fail(OutcomeTimeout, err)
				}
				return nil, err
			}
			if err := s.listSessions(ctx, conn, res, m, agents, opts); err != nil {
				return nil, err
			}
			if len(res.OutsideSessions) > 0 {
				first := res.OutsideSessions[0]
				ev := log.Warn()
				if opts.Strict {
					ev = log.Error()
				}
				ev.Int("sessions", len(res.OutsideSessions)).Int("pid", first.PID).Str("application_name", first.ApplicationName).
					Bool("names_removed", first.NamesRemoved).Str("query", first.Query).
					Msg("database sessions outside any agent are connected")
				if opts.Strict {
					return fail(OutcomeRefused, &OutsideSessionsError{Release: release, Sessions: res.OutsideSessions})
				}
			}
			if opts.DryRun {
				return fail(OutcomeDryRun, nil)
			}
			res.AckedAt = time.Now()
			err = s.enterContracting(ctx, rel.Phase, m, res.ContractEpoch, runner, opts, log)
			var stale *errAcksStale
			if errors.As(err, &stale) {
				log.Warn().Int64("contract_epoch", stale.epoch).Msg("acknowledgements went stale before contracting; waiting again")
				res.ContractEpoch = stale.epoch
				continue
			}
			if err != nil {
				var pe *PreconditionError
				var ue *UnsafeError
				if errors.As(err, &pe) || errors.As(err, &ue) || errors.Is(err, ErrRefused) {
					return fail(OutcomeRefused, err)
				}
				return nil, err
			}
			res.Phase = phase.Contracting
			break
		}
	}

	if opts.BeforeDDL != nil {
		if err := opts.BeforeDDL(); err != nil {
			return fail(OutcomeFailed, err)
		}
	}
	if err := s.lockedDDL(ctx, lock, conn, res, m, opts, log); err != nil {
		outcome := OutcomeFailed
		switch {
		case errors.Is(err, ErrDDLTimeout):
			outcome = OutcomeDDLTimeout
		case errors.Is(err, ErrExecFailed):
			outcome = OutcomeExecFailed
		case errors.Is(err, ErrExecIncomplete):
			outcome = OutcomeExecIncomplete
		}
		if opts.Exec != nil {
			return fail(outcome, err) // its message says what to do, with the command
		}
		return fail(outcome, fmt.Errorf("release %q is in contracting; run 'phasecast contract %s' again to resume: %w", release, release, err))
	}
	if opts.BeforeComplete != nil {
		if err := opts.BeforeComplete(); err != nil {
			return fail(OutcomeFailed, err)
		}
	}
	if _, err := s.flip(ctx, release, phase.Complete, FlipOptions{Actor: opts.Actor, Note: "contract runner: DDL done"}, runner); err != nil {
		return fail(OutcomeFailed, fmt.Errorf("release %q: the DDL ran but marking it complete failed; run 'phasecast contract %s' again: %w", release, release, err))
	}
	res.Phase = phase.Complete
	res.Outcome = OutcomeComplete
	log.Info().Strs("dropped", res.Dropped).Int("attempts", res.Attempts).Dur("waited", res.Waited).Msg("contract complete")
	return res, nil
}

// unlockContract releases the runner's advisory lock. A failure is the
// run's error, and SessionLock.Release has then closed the connection
// rather than return it to the pool still holding the lock.
func (s *Store) unlockContract(lock *SessionLock, log zerolog.Logger) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := lock.Release(ctx)
	if err != nil {
		log.Error().Err(err).Msg("releasing the contract lock failed")
	}
	return err
}

// lockedDDL runs the DDL, or the contract command in its place (Exec),
// once the lock is proven still held (a dry run holds none and runs no
// DDL).
func (s *Store) lockedDDL(ctx context.Context, lock *SessionLock, conn *sqlx.Conn, res *ContractResult, m *Manifest, opts ContractOptions, log zerolog.Logger) error {
	if lock != nil {
		if err := lock.Verify(ctx); err != nil {
			return fmt.Errorf("the runner cannot prove it still holds the contract lock, so it ran no DDL: %w", err)
		}
	}
	if opts.Exec != nil {
		return s.runExec(ctx, conn, res, m, opts, log)
	}
	return s.runDDL(ctx, conn, res, m, opts, log)
}

// leaderGrace bounds how long the runner waits for a live broadcaster
// that does not lead at the moment to lead again: one whose lock session
// failed stands by for two liveness intervals (2s at the default) before
// it tries for the lock again, and refusing in that moment would tell the
// operator to start a broadcaster that is running.
const leaderGrace = 5 * time.Second

// leaderAlive reports whether a leading broadcaster wrote its liveness
// within opts.LeaderWithin. If none did but some broadcaster is alive, it
// waits up to leaderGrace (at most LeaderWithin) for one to lead.
func (s *Store) leaderAlive(ctx context.Context, opts ContractOptions) (bool, error) {
	deadline := time.Now().Add(min(opts.LeaderWithin, leaderGrace))
	for {
		alive, err := s.LeaderAliveWithin(ctx, opts.LeaderWithin)
		if err != nil || alive {
			return alive, err
		}
		standby, err := s.broadcasterAliveWithin(ctx, opts.LeaderWithin, false)
		if err != nil || !standby || !time.Now().Before(deadline) {
			return false, err
		}
		if err := retry.Sleep(ctx, min(opts.PollInterval, time.Until(deadline))); err != nil {
			return false, err
		}
	}
}

// maxBadConns bounds how many dead pooled sessions dedicatedConn discards
// before it gives up.
const maxBadConns = 10

// dedicatedConn takes a session out of the pool for the run. A pooled
// session the server has ended (a restart, pg_terminate_backend) shows only
// on first use, and database/sql retries that for pooled queries but not
// on a dedicated connection: ping it, and take another if it is dead.
func (s *Store) dedicatedConn(ctx context.Context) (*sqlx.Conn, error) {
	for i := 1; ; i++ {
		conn, err := s.db.Connx(ctx)
		if err != nil {
			return nil, err
		}
		err = conn.PingContext(ctx)
		if err == nil {
			return conn, nil
		}
		_ = conn.Close() // a bad connection is discarded, not pooled
		if !errors.Is(err, driver.ErrBadConn) || ctx.Err() != nil || i >= maxBadConns {
			return nil, err
		}
	}
}

// waitForAcks polls the live agents until every one of them knows the
// release and has drained its contract epoch, and returns them. A dry run
// reads them once. It reads on conn, the session that holds the contract
// lock, and proves on each poll that the lock is still held there: if that
// session dies the lock goes with it and another runner may start, so the
// wait stops at the next poll instead of running on unguarded.
func (s *Store) waitForAcks(ctx context.Context, conn *sqlx.Conn, lock *SessionLock, res *ContractResult, release string, start time.Time, opts ContractOptions, log zerolog.Logger) ([]Agent, error) {
	deadline := start.Add(opts.Timeout)
	for {
		if lock != nil {
			if err := lock.Verify(ctx); err != nil {
				if ctx.Err() != nil {
					return nil, err
				}
				return nil, fmt.Errorf("release %q: the runner cannot prove it still holds the contract lock; nothing was dropped: run 'phasecast contract %s' again: %w", release, release, err)
			}
		}
		agents, err := s.agents(ctx, conn, true)
		if err != nil {
			if ctx.Err() != nil {
				return nil, err
			}
			return nil, fmt.Errorf("release %q: reading the agents on the runner's own session, which holds the contract lock, failed; nothing was dropped: run 'phasecast contract %s' again: %w", release, release, notMigrated(err))
		}
		res.Acked, res.Missing, res.OldCode = classifyAgents(agents, release, res.ContractEpoch)
		if opts.Progress != nil {
			opts.Progress(Progress{Release: release, ContractEpoch: res.ContractEpoch, Elapsed: time.Since(start),
				Live: len(agents), Acked: len(res.Acked), Missing: res.Missing, OldCode: res.OldCode})
		}
		if opts.DryRun || len(res.Missing) == 0 && len(res.OldCode) == 0 {
			return agents, nil
		}
		now := time.Now()
		if !now.Before(deadline) {
			return nil, &AckTimeoutError{Release: release, ContractEpoch: res.ContractEpoch, Waited: now.Sub(start),
				Missing: res.Missing, OldCode: res.OldCode}
		}
		log.Debug().Int("live", len(agents)).Int("acked", len(res.Acked)).Int("missing", len(res.Missing)).
			Int("old_code", len(res.OldCode)).Msg("waiting for acknowledgements")
		if err := retry.Sleep(ctx, min(opts.PollInterval, deadline.Sub(now))); err != nil {
			return nil, err
		}
	}
}

// classifyAgents splits live agents into those that acknowledged the
// contract epoch, those that have not yet, and those whose code predates
// the release (which never count as acknowledged). An ID that two live
// processes claim is missing (Agent.Acked), and its description says why.
func classifyAgents(agents []Agent, release string, epoch int64) (acked, missing, oldCode []Agent) {
	acked, missing, oldCode = []Agent{}, []Agent{}, []Agent{}
	for _, a := range agents {
		switch {
		case !a.Knows(release):
			oldCode = append(oldCode, a)
		case a.Acked(release, epoch):
			acked = append(acked, a)
		default:
			missing = append(missing, a)
		}
	}
	return acked, missing, oldCode
}

// runnerIdentity is what the runner records on a release it takes to
// contracting: who runs it, and which process.
func runnerIdentity(actor string) string {
	host, err := os.Hostname()
	if err != nil {
		host = "unknown host"
	}
	return fmt.Sprintf("%s (pid %d on %s)", actor, os.Getpid(), host)
}

// enterContracting takes the release to contracting as runner, once every
// live agent acknowledged contract epoch acked; from is the phase the run
// found it in: contract, or contracting without a runner's identity
// (Recheck), which it then claims by recording its own.
//
// The preconditions and the safety checks run first, with no lock held:
// they are the operator's SQL and catalog walks, and may take as long as a
// full scan of a big table, and holding the epoch row meanwhile stalled
// every status write and store sync until agents fenced. What they rest
// on is then re-read under the release's row lock: its phase, and its
// contract epoch, which a rollback and re-flip since would have moved; a
// change refuses, or sends the runner back to wait. Only the final read
// of the agents and the move hold the epoch row: taking it first orders
// that read after every status batch already committed (RecordStatuses
// holds the same row FOR SHARE), so no lease recorded before the move is
// missed.
func (s *Store) enterContracting(ctx context.Context, from phase.Phase, m *Manifest, acked int64, runner string, opts ContractOptions, log zerolog.Logger) error {
	if err := s.CheckPreconditions(ctx, m); err != nil {
		return err
	}
	problems, _, err := s.CheckSafety(ctx, s.db, m)
	if err != nil {
		return err
	}
	if len(problems) > 0 {
		return &UnsafeError{Release: m.Release, Problems: problems}
	}
	check := func(ctx context.Context, tx *sqlx.Tx, rel *ReleaseRow) error {
		return s.acksStillHold(ctx, tx, rel, acked)
	}
	if from == phase.Contracting {
		err = s.claimContracting(ctx, m.Release, runner, check)
	} else {
		_, err = s.flip(ctx, m.Release, phase.Contracting, FlipOptions{
			Actor: opts.Actor,
			Note:  "contract runner: all live agents acknowledged",
			Check: check,
		}, runner)
	}
	if err == nil {
		log.Info().Str("contracting_by", runner).Msg("release is in contracting")
	}
	return err
}

// acksStillHold is the runner's last check before contracting, in the
// transaction that holds the release's row: the contract epoch is still
// acked, the one the wait and the checks were made for, and every live
// agent, read under the epoch row lock, has acknowledged it.
func (s *Store) acksStillHold(ctx context.Context, tx *sqlx.Tx, rel *ReleaseRow, acked int64) error {
	if rel.ContractEpoch.Int64 != acked {
		return &errAcksStale{epoch: rel.ContractEpoch.Int64}
	}
	if _, err := tx.ExecContext(ctx, s.sql(epochQuery+` FOR UPDATE`)); err != nil {
		return err
	}
	agents, err := s.agents(ctx, tx, true)
	if err != nil {
		return err
	}
	_, missing, oldCode := classifyAgents(agents, rel.Name, acked)
	if len(missing) > 0 || len(oldCode) > 0 {
		return &errAcksStale{epoch: acked}
	}
	return nil
}

// claimContracting records runner as the one that took a release found in
// contracting without a runner's identity there, once check passed under
// its row lock. The phase does not change, so no epoch is spent and
// agents hear nothing.
func (s *Store) claimContracting(ctx context.Context, release, runner string, check func(context.Context, *sqlx.Tx, *ReleaseRow) error) error {
	return s.inTx(ctx, func(tx *sqlx.Tx) error {
		rel, err := s.lockRelease(ctx, tx, release)
		if err != nil {
			return err
		}
		if rel.Phase != phase.Contracting || rel.ContractingBy.Valid {
			return &TransitionError{Release: release, From: rel.Phase, To: phase.Contracting,
				Reason: "it changed while the runner checked it; nothing was dropped: run 'phasecast contract " + release + "' again"}
		}
		if err := check(ctx, tx, rel); err != nil {
			return err
		}
		_, err = tx.ExecContext(ctx, s.sql(`UPDATE @schema.releases SET contracting_by = $2, updated_at = now() WHERE name = $1`), release, runner)
		return err
	})
}

// namesRemoved is a plain text match: the query names a removed table, or a
// removed column and its table, each as a whole word (so "name" is not
// found in "common_name"), case-insensitively. It errs towards yes.
func namesRemoved(query string, m *Manifest) bool {
	q := strings.ToLower(query)
	for _, r := range m.Removed {
		_, table := r.parts()
		if !containsWord(q, strings.ToLower(table)) {
			continue
		}
		if len(r.Columns) == 0 {
			return true
		}
		for _, c := range r.Columns {
			if containsWord(q, strings.ToLower(c)) {
				return true
			}
		}
	}
	return false
}

// containsWord reports whether word occurs in s with no identifier
// character right before or after it.
func containsWord(s, word string) bool {
	if word == "" {
		return false
	}
	for i := 0; ; {
		j := strings.Index(s[i:], word)
		if j < 0 {
			return false
		}
		start, end := i+j, i+j+len(word)
		before, _ := utf8.DecodeLastRuneInString(s[:start])
		after, _ := utf8.DecodeRuneInString(s[end:])
		if !isIdentRune(before) && !isIdentRune(after) {
			return true
		}
		i = start + 1
	}
}

func isIdentRune(r rune) bool {
	return r == '_' || r == '$' || unicode.IsLetter(r) || unicode.IsDigit(r)
}

// DDL retry backoff bounds, after a try that timed out: short, since a
// stream of short transactions leaves gaps often.
const (
	ddlBackoffMin = 50 * time.Millisecond
	ddlBackoffMax = time.Second
)

// runDDL runs each statement in its own transaction with a short
// lock_timeout, and never lets it wait long in the lock queue, where it
// would hold up every query of the table behind it. Before each try it
// looks in pg_locks for other sessions' locks on the table (and, for a
// cascade, on the relations among its planned dependents), and holds off,
// looking again every 10–50ms, while one is held by a transaction open
// longer than the lock_timeout (lockPacer). A try that cannot get its
// lock in time (SQLSTATE 55P03) is retried after a short, capped, jittered
// backoff. A stream of transactions that keeps the table locked lengthens
// the lock_timeout, up to 2s, until a try can wait one out. All until
// opts.DDLTimeout has passed. Every PollInterval, and before each try, it
// looks for live agents running code that predates the release, which may
// have registered since contracting began, and reports each once. Any
// other error stops the run with the release in contracting.
func (s *Store) runDDL(ctx context.Context, conn *sqlx.Conn, res *ContractResult, m *Manifest, opts ContractOptions, log zerolog.Logger) error {
	res.DDLStart = time.Now()
	defer func() { res.DDLEnd = time.Now() }()
	deadline := res.DDLStart.Add(opts.DDLTimeout)
	res.OldCodeDuringDDL = []Agent{}
	planned := make(map[string]bool, len(res.Dependents))
	for _, d := range res.Dependents {
		planned[dependentKey(d)] = true
	}
	var watched time.Time
	watch := func(force bool) error {
		if !force && time.Since(watched) < opts.PollInterval {
			return nil
		}
		watched = time.Now()
		return s.watchOldCode(ctx, conn, res, log)
	}
	for i, r := range m.Removed {
		stmt := r.DDL()
		fail := func(err error) error { return fmt.Errorf("removed[%d]: %s: %w", i, stmt, err) }
		rels, err := ddlRelations(ctx, conn, r)
		if err != nil {
			return fail(err)
		}
		timedOut := func(holder *LockHolder) error {
			if err := s.watchOldCode(ctx, conn, res, log); err != nil {
				log.Warn().Err(err).Msg("reading the agents after the DDL deadline failed")
			}
			return &DDLTimeoutError{Release: res.Release, Index: i, Statement: stmt, Timeout: opts.DDLTimeout,
				Waited: time.Since(res.DDLStart), Attempts: res.Attempts, HeldOff: res.HeldOff, Holder: holder, OldCode: res.OldCodeDuringDDL}
		}
		backoff := retry.Backoff{Min: ddlBackoffMin, Max: ddlBackoffMax}
		pacer := newLockPacer(opts.LockTimeout)
		lengthened := func(why string) {
			log.Info().Str("ddl", stmt).Dur("lock_timeout", pacer.lockTimeout).
				Msgf("DDL lengthens its lock_timeout to %s: %s", pacer.lockTimeout, why)
		}
		var heldBy *LockHolder // the old holder held off for at the last look
		var loggedAt time.Time
		for attempt := 1; ; attempt++ {
			res.Attempts++
			holders, err := lockHolders(ctx, conn, rels)
			if err != nil {
				return fail(err)
			}
			old, holdOff, longer := pacer.look(holders)
			if longer {
				lengthened("transactions open longer than it keep ending while others hold the table, a stream that leaves no gap")
			}
			if holdOff {
				res.HeldOff++
				// Once per holder, and at most every second for a stream.
				if (heldBy == nil || heldBy.PID != old.PID) && time.Since(loggedAt) >= time.Second {
					loggedAt = time.Now()
					log.Warn().Str("ddl", stmt).Int("attempt", attempt).Int("holder_pid", old.PID).Dur("holder_age", old.Age).
						Msgf("DDL holds off: %s holds a lock it needs and is not likely to end within lock_timeout; retrying once it ends", old)
				}
				heldBy = &old
				backoff.Reset()
				if !time.Now().Before(deadline) {
					return timedOut(heldBy)
				}
				if err := watch(false); err != nil {
					return fail(err)
				}
				if err := retry.Sleep(ctx, min(holdOffPoll(), time.Until(deadline))); err != nil {
					return fail(err)
				}
				continue
			}
			heldBy = nil
			if err := watch(true); err != nil {
				return fail(err)
			}
			dropped, gone, err := s.execDDL(ctx, conn, r, stmt, pacer.lockTimeout, planned)
			if err == nil {
				res.Dropped = append(res.Dropped, dropped...)
				res.AlreadyGone = replaceGone(res.AlreadyGone, r, gone)
				ev := log.Info().Str("ddl", stmt).Int("attempt", attempt).Strs("dropped", dropped)
				if len(dropped) == 0 {
					ev.Msg("DDL skipped: what it removes is already gone, so it counts as done")
				} else {
					ev.Msg("DDL done")
				}
				break
			}
			var pqErr *pq.Error
			if !errors.As(err, &pqErr) || pqErr.Code != "55P03" {
				var changed *DependentsChangedError
				if errors.As(err, &changed) {
					changed.Release = res.Release
				}
				return fail(err)
			}
			if pacer.timedOut() {
				lengthened(fmt.Sprintf("%d tries in a row timed out with only younger holders", starveTries))
			}
			if !time.Now().Before(deadline) {
				return timedOut(nil)
			}
			// Jitter keeps retries from lining up with each other or with
			// a periodic job.
			sleep := min(backoff.Next(), time.Until(deadline))
			log.Warn().Str("ddl", stmt).Int("attempt", attempt).Int("young_holders", len(holders)).Dur("retry_in", sleep).
				Msg("DDL could not take its lock within lock_timeout; retrying")
			if err := retry.Sleep(ctx, sleep); err != nil {
				return fail(err)
			}
		}
	}
	return watch(true)
}

// ddlRelations lists the relations r's statement locks: its table and, for
// a cascade, the relations among its dependents (quoted names).
func ddlRelations(ctx context.Context, q sqlx.QueryerContext, r Removal) ([]string, error) {
	rels := []string{r.QuotedTable()}
	if !r.Cascade {
		return rels, nil
	}
	_, deps, err := removalDependents(ctx, q, r)
	if err != nil {
		return nil, fmt.Errorf("dependents of %s: %w", r.QuotedTable(), err)
	}
	return append(rels, deps...), nil
}

// watchOldCode adds to res the live agents running code that predates the
// release that it has not reported yet, and logs each. It reads on conn,
// the runner's own session, between DDL attempts.
func (s *Store) watchOldCode(ctx context.Context, conn *sqlx.Conn, res *ContractResult, log zerolog.Logger) error {
	agents, err := s.agents(ctx, conn, true)
	if err != nil {
		return fmt.Errorf("reading the agents: %w", err)
	}
	for _, a := range agents {
		if a.Knows(res.Release) || slices.ContainsFunc(res.OldCodeDuringDDL, func(o Agent) bool { return o.ID == a.ID }) {
			continue
		}
		res.OldCodeDuringDDL = append(res.OldCodeDuringDDL, a)
		log.Warn().Str("agent", a.ID).Str("service", a.Service).Str("host", a.Host).Int("pid", a.PID).Str("version", a.Version).
			Msgf("agent %s (service %s on host %s, pid %d) runs code that predates %s and appeared during the DDL: it may still name the removed columns",
				a.ID, a.Service, a.Host, a.PID, res.Release)
	}
	return nil
}

// replaceGone replaces what list says is gone of removal r with gone, as
// the DDL found it.
func replaceGone(list []Gone, r Removal, gone []Gone) []Gone {
	out := slices.DeleteFunc(slices.Clone(list), func(g Gone) bool {
		return g.Removal == r.Key() && (g.Column == "" || slices.Contains(r.Columns, g.Column))
	})
	return append(out, gone...)
}

// maxLockRounds bounds how often execDDL locks newly found dependent
// relations and looks again before a DROP … CASCADE.
const maxLockRounds = maxDependentDepth

// execDDL runs one statement and returns the quoted names of the columns or
// table it dropped, and what was already gone. When everything the removal
// names is gone it runs nothing, so a table dropped elsewhere never fails
// the run. Otherwise it first locks the table (under lock_timeout), which
// keeps new objects from coming to depend on it, lists the dependents again
// (locking, for a cascade, each relation among them and looking again until
// no new one turns up), and refuses with a *DependentsChangedError,
// rolling back, when one is not in planned: the DROP runs in this
// transaction, so what it takes is exactly what was listed here.
func (s *Store) execDDL(ctx context.Context, conn *sqlx.Conn, r Removal, stmt string, lockTimeout time.Duration, planned map[string]bool) (dropped []string, gone []Gone, err error) {
	tx, err := conn.BeginTxx(ctx, nil)
	if err != nil {
		return nil, nil, err
	}
	defer func() { _ = tx.Rollback() }()
	if _, err := tx.ExecContext(ctx, `SELECT set_config('lock_timeout', $1, true)`, fmt.Sprintf("%dms", lockTimeout.Milliseconds())); err != nil {
		return nil, nil, err
	}
	present, gone, err := removalPresence(ctx, tx, r)
	if err != nil || len(present) == 0 {
		return nil, gone, err
	}
	if _, err := tx.ExecContext(ctx, `LOCK TABLE `+r.QuotedTable()+` IN ACCESS EXCLUSIVE MODE`); err != nil {
		var pqErr *pq.Error
		if errors.As(err, &pqErr) && (pqErr.Code == "42P01" || pqErr.Code == "3F000") {
			// Dropped between the look and the lock.
			return nil, []Gone{{Removal: r.Key(), Name: r.QuotedTable()}}, nil
		}
		return nil, nil, err
	}
	// Read again under the lock: columns may have gone in between.
	if present, gone, err = removalPresence(ctx, tx, r); err != nil || len(present) == 0 {
		return nil, gone, err
	}
	if err := checkDependentsUnchanged(ctx, tx, r, planned); err != nil {
		return nil, nil, err
	}
	if _, err := tx.ExecContext(ctx, stmt); err != nil {
		return nil, nil, err
	}
	if err := tx.Commit(); err != nil {
		return nil, nil, err
	}
	dropped = make([]string, len(present))
	for i, p := range present {
		if len(r.Columns) > 0 {
			p = r.QuotedTable() + "." + pq.QuoteIdentifier(p)
		}
		dropped[i] = p
	}
	return dropped, gone, nil
}

// checkDependentsUnchanged lists r's dependents in tx, with r's table
// already locked, and refuses when one is not in planned. For a cascade it
// first locks every relation among the dependents, and looks again until
// no new one turns up: a view on a listed view could otherwise appear
// between this look and the DROP and go with it unseen.
func checkDependentsUnchanged(ctx context.Context, tx *sqlx.Tx, r Removal, planned map[string]bool) error {
	locked := map[string]bool{}
	for round := 1; ; round++ {
		deps, rels, err := removalDependents(ctx, tx, r)
		if err != nil {
			return fmt.Errorf("dependents of %s: %w", r.QuotedTable(), err)
		}
		var added []Dependent
		for _, d := range deps {
			if !planned[dependentKey(d)] {
				added = append(added, d)
			}
		}
		if len(added) > 0 {
			return &DependentsChangedError{Removal: r.Key(), Cascade: r.Cascade, Added: added}
		}
		var lock []string
		for _, rel := range rels {
			if !locked[rel] {
				locked[rel] = true
				lock = append(lock, rel)
			}
		}
		if !r.Cascade || len(lock) == 0 {
			return nil
		}
		if round > maxLockRounds {
			return fmt.Errorf("dependents of %s: still finding new ones after %d rounds of locking", r.QuotedTable(), maxLockRounds)
		}
		if _, err := tx.ExecContext(ctx, `LOCK TABLE `+strings.Join(lock, ", ")+` IN ACCESS EXCLUSIVE MODE`); err != nil {
			return err
		}
	}
}

// dependentKey identifies a dependent across two walks of the catalogs.
func dependentKey(d Dependent) string { return d.Removal + "\x00" + d.Object() }
