package wire

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"regexp"
	"strings"
	"time"

	"github.com/phasecast/phasecast/internal/phase"
)

// Version is the protocol version of the states and grants this build
// sends and accepts.
const Version = 1

// StatusVersion is the version of the statuses this build sends and
// accepts. v2 statuses carry the agent's token (Status.Token); a v1 status
// is refused, so an agent built before per-agent credentials is told
// (broadcaster log and counter: version) rather than trusted.
const StatusVersion = 2

// TokenSize is the size of an agent's token, in bytes: Status.Token is
// its lower-case hex.
const TokenSize = 32

// MaxMessageSize is the largest body a decoder accepts (1 MiB).
const MaxMessageSize = 1 << 20

// MaxIncarnation is the longest Status.Incarnation a decoder accepts.
const MaxIncarnation = 64

// Kind names a message type.
type Kind string

const (
	KindState  Kind = "state"
	KindStatus Kind = "status"
	KindGrant  Kind = "grant"
)

// Sentinel errors, wrapped with detail by the decoders.
var (
	ErrTooLarge  = errors.New("message too large")
	ErrMalformed = errors.New("malformed message")
	ErrVersion   = errors.New("unsupported protocol version")
	ErrKind      = errors.New("wrong message kind")
	ErrInvalid   = errors.New("invalid message")
)

// Removal is one removed() directive as agents see it. Table is written as
// in the manifest: "instances" or "nova.instances". No columns means the
// whole table goes.
type Removal struct {
	Table   string   `json:"table"`
	Columns []string `json:"columns,omitempty"`
}

// Release is one release's phase and removals.
type Release struct {
	Name     string      `json:"name"`
	Phase    phase.Phase `json:"phase"`
	Removals []Removal   `json:"removals,omitempty"`
}

// State is the whole versioning state at one epoch. Agents apply a state
// only if its epoch is higher than the one they hold.
type State struct {
	V    int  `json:"v"`
	Kind Kind `json:"kind"`
	// StoreID is the identity of the store the state comes from
	// (schema.Store.ID), so that agents without a database learn which
	// store their statuses belong to. Empty from a broadcaster that
	// predates store identities. The digest leaves it out (see Digest).
	StoreID  string    `json:"store_id,omitempty"`
	Epoch    int64     `json:"epoch"`
	Releases []Release `json:"releases"`
	SentAt   time.Time `json:"sent_at"`
}

// Status is an agent's report: sent at start, after every drain (the
// acknowledgement) and as a heartbeat.
type Status struct {
	V    int  `json:"v"`
	Kind Kind `json:"kind"`
	// StoreID names the store the status belongs to: the StoreID of the
	// states the agent holds, or of its own database. The broadcaster
	// drops a status that names another store, or none: the status queue
	// is named by the exchange prefix alone, and may still hold statuses
	// of an earlier run against a store since dropped and migrated again.
	StoreID string `json:"store_id,omitempty"`
	AgentID string `json:"agent_id"`
	// Incarnation is random per agent process (drawn by agent.New). Seq
	// orders statuses within one incarnation only, and the store tells
	// two live processes that claim one AgentID apart by it. Empty from
	// agents that predate it.
	Incarnation string `json:"incarnation,omitempty"`
	// Token is the secret the agent process drew with its incarnation
	// (TokenSize random bytes, lower-case hex). The store keeps its
	// SHA-256 in the agent's row: only a status carrying it changes the
	// row. It is never logged or shown.
	Token        string   `json:"token,omitempty"`
	Service      string   `json:"service"`
	Host         string   `json:"host"`
	PID          int      `json:"pid"`
	Version      string   `json:"version"`
	Releases     []string `json:"releases"`
	Seq          uint64   `json:"seq"`
	AppliedEpoch int64    `json:"applied_epoch"`
	DrainedEpoch int64    `json:"drained_epoch"`
	// Inflight counts guards still pinned to snapshots older than the
	// applied one.
	Inflight int64 `json:"inflight"`
	// AppName is the application_name of the service's database sessions,
	// so the contract runner can tell them from sessions nobody vouches for.
	AppName string `json:"app_name,omitempty"`
	// SentAt is when the agent sent the status, on its clock. A status
	// older than a lease asks for a lease that would already have run
	// out: the broadcaster drops it (and the agent sets the AMQP
	// expiration to the lease, so the broker drops it too).
	SentAt time.Time `json:"sent_at"`
	// SkipGrant asks the broadcaster to record the status without a
	// grant: the agent's lease is still fresh. Acks set it, so a flip
	// costs each agent one message back, not a status and a grant. A
	// status without it (older agents) is granted as before.
	SkipGrant bool `json:"skip_grant,omitempty"`
	// Leaving is the agent's goodbye, sent by Stop when no guard is open:
	// none will open again, so the store ends its lease at once and the
	// runner need not wait it out. It earns no grant.
	Leaving bool `json:"leaving,omitempty"`
}

// WantsGrant reports whether a status recorded at epoch should be answered
// with a grant: unless it skips one, and even then when the agent is
// behind epoch, which the grant tells it; never a goodbye.
func (s Status) WantsGrant(epoch int64) bool {
	return !s.Leaving && (!s.SkipGrant || s.AppliedEpoch < epoch)
}

// Grant answers one recorded status: the agent's lease is extended, and
// Epoch tells an agent that missed a state that it is behind.
type Grant struct {
	V       int    `json:"v"`
	Kind    Kind   `json:"kind"`
	AgentID string `json:"agent_id"`
	// Incarnation is the agent process the grant is for: the one whose
	// status the store recorded. An agent ignores a grant for another.
	Incarnation string `json:"incarnation,omitempty"`
	Seq         uint64 `json:"seq"`
	LeaseMS     int64  `json:"lease_ms"`
	Epoch       int64  `json:"epoch"`
}

// Lease returns the lease length the grant carries.
func (g Grant) Lease() time.Duration { return time.Duration(g.LeaseMS) * time.Millisecond }

// EncodeState stamps v and kind and encodes s.
func EncodeState(s State) ([]byte, error) {
	s.V, s.Kind = Version, KindState
	if s.Releases == nil {
		s.Releases = []Release{}
	}
	return json.Marshal(s)
}

// EncodeStatus stamps v and kind and encodes s.
func EncodeStatus(s Status) ([]byte, error) {
	s.V, s.Kind = StatusVersion, KindStatus
	return json.Marshal(s)
}

// EncodeGrant stamps v and kind and encodes g.
func EncodeGrant(g Grant) ([]byte, error) {
	g.V, g.Kind = Version, KindGrant
	return json.Marshal(g)
}

// DecodeState decodes and validates a state message.
func DecodeState(body []byte) (State, error) {
	var s State
	if err := decode(body, KindState, &s); err != nil {
		return State{}, err
	}
	if s.Epoch < 0 {
		return State{}, fmt.Errorf("%w: negative epoch %d", ErrInvalid, s.Epoch)
	}
	seen := make(map[string]bool, len(s.Releases))
	for _, r := range s.Releases {
		if r.Name == "" {
			return State{}, fmt.Errorf("%w: release with no name", ErrInvalid)
		}
		if seen[r.Name] {
			return State{}, fmt.Errorf("%w: release %q listed twice", ErrInvalid, r.Name)
		}
		seen[r.Name] = true
		if !r.Phase.Valid() {
			return State{}, fmt.Errorf("%w: release %q has unknown phase %q", ErrInvalid, r.Name, r.Phase)
		}
		for _, rm := range r.Removals {
			if rm.Table == "" {
				return State{}, fmt.Errorf("%w: release %q has a removal with no table", ErrInvalid, r.Name)
			}
		}
	}
	return s, nil
}

// DecodeStatus decodes and validates a status message.
func DecodeStatus(body []byte) (Status, error) {
	var s Status
	if err := decode(body, KindStatus, &s); err != nil {
		return Status{}, err
	}
	switch {
	case s.AgentID == "":
		return Status{}, fmt.Errorf("%w: status with no agent_id", ErrInvalid)
	case len(s.AgentID) > 200:
		return Status{}, fmt.Errorf("%w: agent_id longer than 200 bytes", ErrInvalid)
	case s.Incarnation == "":
		return Status{}, fmt.Errorf("%w: status with no incarnation", ErrInvalid)
	case len(s.Incarnation) > MaxIncarnation:
		return Status{}, fmt.Errorf("%w: incarnation longer than %d bytes", ErrInvalid, MaxIncarnation)
	case !ValidToken(s.Token):
		return Status{}, fmt.Errorf("%w: status without a token of %d bytes in lower-case hex", ErrInvalid, TokenSize)
	case s.AppliedEpoch < 0 || s.DrainedEpoch < 0:
		return Status{}, fmt.Errorf("%w: negative epoch", ErrInvalid)
	case s.DrainedEpoch > s.AppliedEpoch:
		return Status{}, fmt.Errorf("%w: drained_epoch %d ahead of applied_epoch %d", ErrInvalid, s.DrainedEpoch, s.AppliedEpoch)
	case s.Inflight < 0:
		return Status{}, fmt.Errorf("%w: negative inflight", ErrInvalid)
	// What JSON allows but the store or the broker cannot take: one such
	// status would otherwise fail its whole batch on every redelivery.
	case s.PID < math.MinInt32 || s.PID > math.MaxInt32:
		return Status{}, fmt.Errorf("%w: pid %d out of range", ErrInvalid, s.PID)
	case s.Seq > math.MaxInt64:
		return Status{}, fmt.Errorf("%w: seq %d out of range", ErrInvalid, s.Seq)
	}
	for _, str := range append([]string{s.AgentID, s.Incarnation, s.Service, s.Host, s.Version, s.AppName}, s.Releases...) {
		if strings.ContainsRune(str, 0) {
			return Status{}, fmt.Errorf("%w: NUL byte in a string", ErrInvalid)
		}
	}
	return s, nil
}

// DecodeGrant decodes and validates a grant message.
func DecodeGrant(body []byte) (Grant, error) {
	var g Grant
	if err := decode(body, KindGrant, &g); err != nil {
		return Grant{}, err
	}
	if g.LeaseMS <= 0 || g.Epoch < 0 {
		return Grant{}, fmt.Errorf("%w: grant with lease_ms %d, epoch %d", ErrInvalid, g.LeaseMS, g.Epoch)
	}
	// Lease() would overflow time.Duration and turn negative.
	if g.LeaseMS > math.MaxInt64/int64(time.Millisecond) {
		return Grant{}, fmt.Errorf("%w: lease_ms %d is too large", ErrInvalid, g.LeaseMS)
	}
	return g, nil
}

// header is what every message starts with. A message of another kind or
// version is named as such rather than as a type error in some field.
type header struct {
	V    int  `json:"v"`
	Kind Kind `json:"kind"`
}

func (h header) check(kind Kind) error {
	if h.Kind != kind {
		if h.V != Version && h.V != StatusVersion {
			return fmt.Errorf("%w: v=%d (this build speaks v=%d)", ErrVersion, h.V, versionOf(kind))
		}
		return fmt.Errorf("%w: got %q, want %q", ErrKind, h.Kind, kind)
	}
	if want := versionOf(kind); h.V != want {
		return fmt.Errorf("%w: %s v=%d (this build speaks v=%d)", ErrVersion, kind, h.V, want)
	}
	return nil
}

// versionOf is the version this build speaks for messages of kind.
func versionOf(kind Kind) int {
	if kind == KindStatus {
		return StatusVersion
	}
	return Version
}

// ValidToken reports whether token is a Status.Token: TokenSize bytes in
// lower-case hex.
func ValidToken(token string) bool {
	if len(token) != 2*TokenSize {
		return false
	}
	for i := 0; i < len(token); i++ {
		if c := token[i]; (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// RedactToken returns body with the value of any "token" member replaced,
// for logging a status's excerpt: the token is a credential.
func RedactToken(body []byte) []byte {
	return tokenMember.ReplaceAll(body, []byte(`"token":"(redacted)"`))
}

var tokenMember = regexp.MustCompile(`"token"\s*:\s*"[^"]*"?`)

// message is a decoded message's header.
type message interface{ header() header }

func (s *State) header() header  { return header{s.V, s.Kind} }
func (s *Status) header() header { return header{s.V, s.Kind} }
func (g *Grant) header() header  { return header{g.V, g.Kind} }

// decode decodes body into into and checks its version and kind. A good
// message is parsed once: every agent parses every state and grant, and
// the broadcaster every status, so this is on the path of every flip. Only
// a body that does not decode is parsed again, for its header alone, to
// say whether it is of another version or kind rather than malformed.
// json.Unmarshal refuses trailing data after the value.
func decode(body []byte, kind Kind, into message) error {
	if err := CheckSize(body); err != nil {
		return err
	}
	err := json.Unmarshal(body, into)
	if err == nil {
		return into.header().check(kind)
	}
	var h header
	if herr := json.Unmarshal(body, &h); herr != nil {
		return fmt.Errorf("%w: %v", ErrMalformed, herr)
	}
	if herr := h.check(kind); herr != nil {
		return herr
	}
	return fmt.Errorf("%w: %v", ErrMalformed, err)
}
