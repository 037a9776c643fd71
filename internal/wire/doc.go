// Package wire defines the three AMQP messages phasecast exchanges (state,
// status and grant), their strict decoders, and their signatures.
//
// Every message is JSON with a protocol version "v" and a "kind". Decoders
// refuse anything over MaxMessageSize, an unknown version, the wrong kind,
// wrong types and values that cannot be right (a negative epoch, an unknown
// phase); unknown fields are ignored so that newer senders stay compatible.
//
// State and grant messages are signed with Ed25519 by the broadcaster, so an
// agent holding only the public key cannot forge a phase. Status messages are
// authenticated with HMAC-SHA256. Signatures travel in AMQP headers, over the
// exact body bytes.
//
// docs/PROTOCOL.md specifies the protocol for implementers in other
// languages, and testdata/protocol holds conformance vectors that
// protocol_vectors_test.go writes from, and checks against, this package.
package wire
