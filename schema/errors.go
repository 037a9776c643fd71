package schema

import (
	"errors"
	"fmt"
	"strings"

	"github.com/phasecast/phasecast/internal/phase"
)

// Sentinels callers branch on.
var (
	ErrUnknownRelease  = errors.New("unknown release")
	ErrRefused         = errors.New("transition refused")
	ErrManifestChanged = errors.New("manifest changed after expand")
	ErrPrecondition    = errors.New("precondition failed")
)

// UnknownReleaseError names the release that is not registered.
type UnknownReleaseError struct{ Release string }

func (e *UnknownReleaseError) Error() string {
	return fmt.Sprintf("unknown release %q: register it with 'phasecast release apply FILE'", e.Release)
}
func (e *UnknownReleaseError) Unwrap() error { return ErrUnknownRelease }

// TransitionError is a refused flip: it says where the release stands and
// which moves are allowed from there.
type TransitionError struct {
	Release  string
	From, To phase.Phase
	Reason   string // why, when the move itself would be allowed
}

func (e *TransitionError) Error() string {
	if e.Reason != "" {
		return fmt.Sprintf("release %q: cannot move %s → %s: %s", e.Release, e.From, e.To, e.Reason)
	}
	allowed := "none: the release is complete"
	if next := e.From.Next(); len(next) > 0 {
		names := make([]string, len(next))
		for i, p := range next {
			names[i] = string(p)
			if p.RunnerOnly() {
				names[i] += " (by 'phasecast contract " + e.Release + "')"
			}
		}
		allowed = strings.Join(names, ", ")
	}
	return fmt.Sprintf("release %q is in %s: cannot move to %s (allowed from %s: %s)", e.Release, e.From, e.To, e.From, allowed)
}
func (e *TransitionError) Unwrap() error { return ErrRefused }

// ExpandError names the expand statement that failed. The release's
// transaction was rolled back, so nothing of it was applied.
type ExpandError struct {
	Index int
	Err   error
}

func (e *ExpandError) Error() string {
	return fmt.Sprintf("expand[%d] failed, nothing was applied: %v", e.Index, e.Err)
}
func (e *ExpandError) Unwrap() error { return e.Err }

// PreconditionError names the precondition that returned a row.
type PreconditionError struct {
	Release string
	Name    string
	Err     error // set when the precondition's SQL itself failed
}

func (e *PreconditionError) Error() string {
	if e.Err != nil {
		return fmt.Sprintf("release %q: precondition %q failed to run: %v", e.Release, e.Name, e.Err)
	}
	return fmt.Sprintf("release %q: precondition %q returned a row", e.Release, e.Name)
}
func (e *PreconditionError) Unwrap() error { return ErrPrecondition }
