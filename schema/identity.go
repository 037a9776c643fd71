package schema

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"
)

// StatusKey names one agent process's status: the agent's ID and the
// incarnation (wire.Status.Incarnation) of the process that sent it.
type StatusKey struct {
	AgentID     string `json:"agent_id"`
	Incarnation string `json:"incarnation"`
}

// ErrStatusIgnored means the store did not record an agent's status, so
// it granted no lease: the agent must stay fenced.
var ErrStatusIgnored = errors.New("status ignored by the store")

// StatusIgnoredError says why the store did not record a status.
type StatusIgnoredError struct {
	AgentID     string
	Incarnation string // the ignored status's
	Seq         uint64 // the ignored status's
	// Conflict: another live process holds the ID. Holder… describe the
	// row the store kept.
	Conflict          bool
	HolderIncarnation string
	HolderHost        string
	HolderPID         int
	HolderSeq         int64
	// Refused is why the status changed nothing when it did not prove who
	// sent it: a Refusal reason (RefusedUnauthenticated, RefusedSeqBound).
	Refused string
}

func (e *StatusIgnoredError) Error() string {
	switch e.Refused {
	case RefusedUnauthenticated:
		return fmt.Sprintf("%s: status seq %d of agent %q: refused as unauthenticated: its token is not the one the agent's row is bound to, or this database role is not allowed to enrol agents of its service ('phasecast agents allow')",
			ErrStatusIgnored, e.Seq, e.AgentID)
	case RefusedSeqBound:
		return fmt.Sprintf("%s: status seq %d of agent %q: refused: the seq is more than 2^40 ahead of the agent's row", ErrStatusIgnored, e.Seq, e.AgentID)
	}
	if e.Conflict {
		return fmt.Sprintf("%s: status seq %d of agent %q: the ID is held by another live process (host %s, pid %d, incarnation %q) until its lease ends; give each process its own ID",
			ErrStatusIgnored, e.Seq, e.AgentID, e.HolderHost, e.HolderPID, e.HolderIncarnation)
	}
	if e.HolderIncarnation == e.Incarnation {
		return fmt.Sprintf("%s: status seq %d of agent %q: the store holds seq %d of the same incarnation %q, which is not older",
			ErrStatusIgnored, e.Seq, e.AgentID, e.HolderSeq, e.Incarnation)
	}
	return fmt.Sprintf("%s: status seq %d of agent %q: another status took the agent's row at the same moment", ErrStatusIgnored, e.Seq, e.AgentID)
}

func (e *StatusIgnoredError) Unwrap() error { return ErrStatusIgnored }

// Rival is another live process that claims an agent's ID: its statuses
// are refused while the row's holder has a live lease.
type Rival struct {
	Incarnation string    `json:"incarnation"`
	Service     string    `json:"service"`
	Host        string    `json:"host"`
	PID         int       `json:"pid"`
	Version     string    `json:"version"`
	Seq         int64     `json:"seq"`
	FirstSeen   time.Time `json:"first_seen"`
	LastSeen    time.Time `json:"last_seen"`
	ExpiresAt   time.Time `json:"expires_at"`
}

// Rivals is the JSON column agentColumns reads them into.
type Rivals []Rival

// Scan implements sql.Scanner.
func (r *Rivals) Scan(src any) error {
	var b []byte
	switch v := src.(type) {
	case nil:
		*r = nil
		return nil
	case []byte:
		b = v
	case string:
		b = []byte(v)
	default:
		return fmt.Errorf("rivals: cannot scan %T", src)
	}
	var out Rivals
	if err := json.Unmarshal(b, &out); err != nil {
		return err
	}
	if len(out) == 0 {
		out = nil
	}
	*r = out
	return nil
}

// rivalsColumn lists, for each agents row, the rival incarnations whose
// claim is still live.
const rivalsColumn = `(SELECT json_agg(json_build_object('incarnation', c.incarnation, 'service', c.service, 'host', c.host,
        'pid', c.pid, 'version', c.version, 'seq', c.seq, 'first_seen', c.first_seen, 'last_seen', c.last_seen,
        'expires_at', c.expires_at) ORDER BY c.first_seen, c.incarnation)
    FROM @schema.agent_conflicts c WHERE ` + liveRivalOf + `) AS rivals`

// liveRivalOf holds for a row c of @schema.agent_conflicts that claims
// the ID of the current row of @schema.agents with a live claim: the
// condition of Agent.Conflicted.
const liveRivalOf = `c.id = agents.id AND c.incarnation <> agents.incarnation AND c.expires_at > now()`

// Conflicted reports whether another live process claims the agent's ID.
// Such an ID never counts as acknowledged: the store holds one process's
// state, and the other may still run on any snapshot.
func (a *Agent) Conflicted() bool { return len(a.Rivals) > 0 }

// ConflictNote says, for an agent whose ID is claimed twice, who else
// claims it; it is empty otherwise.
func (a *Agent) ConflictNote() string {
	if !a.Conflicted() {
		return ""
	}
	parts := make([]string, len(a.Rivals))
	for i, r := range a.Rivals {
		parts[i] = fmt.Sprintf("host %s, pid %d, incarnation %q", r.Host, r.PID, r.Incarnation)
	}
	return fmt.Sprintf("ID claimed by two live processes: host %s, pid %d, incarnation %q (recorded) and %s (ignored, fenced); not acknowledged until one stops",
		a.Host, a.PID, a.Incarnation, strings.Join(parts, "; "))
}
