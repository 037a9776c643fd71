// Package keys loads and generates the key material that authenticates
// phasecast's messages: an Ed25519 key pair for state and grant messages
// (the broadcaster holds the private key, agents only the public one) and
// an HMAC-SHA256 key for status messages.
//
// Keys are kept as base64 text, one value a line, in files (state.key,
// state.pub, status.mac, written by WriteFiles) or directly in the
// environment (PHASECAST_STATE_KEY, PHASECAST_STATE_PUB,
// PHASECAST_STATUS_MAC). A key that is not configured is nil: wire.Verify
// and wire.CheckMAC then accept unsigned messages, and a sender must not
// call wire.Sign or wire.MAC without its key.
//
// No error from this package contains key material: errors name the file
// or environment variable and say what is wrong with its value.
package keys
