// Package testenv gives each test its own isolated corner of the real
// PostgreSQL and RabbitMQ servers: a fresh schema, a fresh exchange prefix,
// both removed when the test ends. A server that cannot be reached fails the
// test; it never skips it, because CI has the servers. NewLeastPrivilege
// sets up the RabbitMQ users docs/rabbitmq-permissions.md describes, parsed
// from that document, in a vhost of the test's own. PgBouncer starts a
// PgBouncer of the test's own in front of the test database, in session or
// transaction mode; a missing pgbouncer binary fails the test too.
//
// Beside the servers it holds what the tests of several packages would
// otherwise each write again: Build compiles phasecast's commands once
// per test binary and StartProc runs one as a process of its own, for
// the fault and soak tests; LogBuffer collects log lines that a test's
// goroutines write and the test reads.
//
// It is test support, not plumbing: it is the one package under internal/
// that imports one of phasecast's own (schema, to hand each test a migrated
// Store), and only tests import it, so it sits beside the plumbing without
// standing on top of it.
package testenv
