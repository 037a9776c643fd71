// Package fleet starts the moving parts of a phasecast deployment in one
// process: a broadcaster and N instances of the novalike example service
// (each with its own agent and workers). The demo, the fleet benchmark and
// the integration tests all drive a fleet through it, so there is one way
// to stand one up and one way to tear it down.
package fleet
