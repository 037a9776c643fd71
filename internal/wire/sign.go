package wire

import (
	"crypto/ed25519"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
)

// AMQP header names that carry authentication over the exact body bytes.
const (
	SignatureHeader = "phasecast-signature" // Ed25519, on state and grant
	MACHeader       = "phasecast-mac"       // HMAC-SHA256, on status
)

var (
	// ErrUnsigned means keys are configured but the message carries none.
	ErrUnsigned = errors.New("message is not signed")
	// ErrBadSignature means the signature or MAC does not match the body.
	ErrBadSignature = errors.New("bad signature")
)

// Sign returns the base64 Ed25519 signature of body.
func Sign(key ed25519.PrivateKey, body []byte) string {
	return base64.StdEncoding.EncodeToString(ed25519.Sign(key, body))
}

// Verify checks sig against body. With no key configured every message
// passes: the agent then relies on confirming epochs against the store.
func Verify(key ed25519.PublicKey, body []byte, sig string) error {
	if key == nil {
		return nil
	}
	if sig == "" {
		return ErrUnsigned
	}
	// ed25519.Verify panics on a key of the wrong size; refuse instead.
	if len(key) != ed25519.PublicKeySize {
		return fmt.Errorf("%w: public key is %d bytes, want %d", ErrBadSignature, len(key), ed25519.PublicKeySize)
	}
	raw, err := base64.StdEncoding.DecodeString(sig)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrBadSignature, err)
	}
	if !ed25519.Verify(key, body, raw) {
		return ErrBadSignature
	}
	return nil
}

// MAC returns the base64 HMAC-SHA256 of body under key.
func MAC(key, body []byte) string {
	m := hmac.New(sha256.New, key)
	m.Write(body)
	return base64.StdEncoding.EncodeToString(m.Sum(nil))
}

// CheckMAC checks mac against body. With no key configured every message
// passes.
func CheckMAC(key, body []byte, mac string) error {
	if key == nil {
		return nil
	}
	if mac == "" {
		return ErrUnsigned
	}
	raw, err := base64.StdEncoding.DecodeString(mac)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrBadSignature, err)
	}
	m := hmac.New(sha256.New, key)
	m.Write(body)
	if !hmac.Equal(raw, m.Sum(nil)) {
		return ErrBadSignature
	}
	return nil
}
