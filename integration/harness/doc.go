// Package harness is the test support that the end-to-end tests
// (integration) and the fault tests (integration/faults) share: one test's
// world (a store in a schema of its own, an AMQP prefix of its own and an
// application schema holding the table releases change), and the one way
// those tests configure, start, wait on and stop broadcasters, agents and
// services, and run the phasecast command in-process.
//
// It is test support, imported only by tests. Unlike the packages under
// internal/, it stands on top of the tree: it imports agent, broadcaster,
// schema, cmd/phasecast/fleet and cmd/phasecast/cli. It is an ordinary
// package rather than a _test.go file so that both test packages can
// import it.
package harness
