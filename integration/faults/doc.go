// Package faults holds phasecast's fault and hostile-input tests: servers
// that die, networks that split, processes killed with SIGKILL, and
// messages that are malformed or forged, each against real PostgreSQL and
// RabbitMQ (docs/RELIABILITY.md has the figures). Every test counts the
// queries that failed, which must be zero, and checks that the contract
// runner dropped nothing before every live agent had acknowledged.
//
// Tests whose name contains "Serial" restart the shared broker, which
// breaks every other test talking to it. They run only with
// PHASECAST_FAULTS_SERIAL=1, which .ci/run sets in a step of its own after
// the parallel test run:
//
//	PHASECAST_FAULTS_SERIAL=1 go test -race -count=1 -run Serial ./integration/faults/
//
// A server that cannot be reached fails a test; it never skips it.
package faults
