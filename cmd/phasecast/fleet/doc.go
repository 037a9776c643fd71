// Package fleet starts the moving parts of a phasecast deployment in one
// process: a broadcaster and N instances of the novalike example service
// (each with its own agent and workers). The demo, the fleet benchmark and
// the integration tests all drive a fleet through it, so there is one way
// to stand one up and one way to tear it down.
//
// It sits under cmd/phasecast, above agent, broadcaster and schema, because
// it exists for the binary's demo and bench; it is not internal so that the
// integration tests can stand up the same fleet.
package fleet
