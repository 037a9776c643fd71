package wire

import (
	"errors"
	"fmt"
)

// Reasons a message is refused, as agents and the broadcaster count and
// log them (agent.Reject…, broadcaster.Reject…).
const (
	ReasonTooLarge     = "too_large"     // over MaxMessageSize
	ReasonMalformed    = "malformed"     // not JSON, or a field of the wrong type
	ReasonVersion      = "version"       // a protocol version this build does not speak
	ReasonKind         = "kind"          // a message of another kind
	ReasonInvalid      = "invalid"       // well-formed but impossible (negative epoch, unknown phase, …)
	ReasonUnsigned     = "unsigned"      // a key is configured and the message carries no signature or MAC
	ReasonBadSignature = "bad_signature" // the signature or MAC does not match the body
)

// reasons pairs each sentinel with its reason, in the order Reason tries
// them.
var reasons = [...]struct {
	err    error
	reason string
}{
	{ErrTooLarge, ReasonTooLarge},
	{ErrVersion, ReasonVersion},
	{ErrKind, ReasonKind},
	{ErrInvalid, ReasonInvalid},
	{ErrUnsigned, ReasonUnsigned},
	{ErrBadSignature, ReasonBadSignature},
}

// Reason names why err refused a message: the Reason… constant of the
// sentinel it wraps, ReasonMalformed for any other error.
func Reason(err error) string {
	for _, r := range reasons {
		if errors.Is(err, r.err) {
			return r.reason
		}
	}
	return ReasonMalformed
}

// CheckSize refuses a body over MaxMessageSize with ErrTooLarge. The
// decoders check it first; a receiver checks it before it spends a
// signature check on the body.
func CheckSize(body []byte) error {
	if len(body) > MaxMessageSize {
		return fmt.Errorf("%w: %d bytes (limit %d)", ErrTooLarge, len(body), MaxMessageSize)
	}
	return nil
}
