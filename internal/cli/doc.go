// Package cli implements the phasecast command: each subcommand parses its
// flags (with environment-variable fallbacks), does its work through the
// schema, broadcaster and agent packages, and writes to injected writers,
// so tests run the real commands in-process and check their output and
// exit codes.
package cli
