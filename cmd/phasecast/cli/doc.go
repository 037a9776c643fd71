// Package cli implements the phasecast command: each subcommand parses its
// flags (with environment-variable fallbacks), does its work through the
// schema, broadcaster and agent packages, and writes to injected writers,
// so tests run the real commands in-process and check their output and
// exit codes.
//
// It lives under cmd/phasecast because only the binary needs it, and is not
// internal so that the end-to-end tests in integration/ can run it (the
// shape of River's cmd/river/rivercli). main.go only wires signals to Main.
package cli
