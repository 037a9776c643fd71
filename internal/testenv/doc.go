// Package testenv gives each test its own isolated corner of the real
// PostgreSQL and RabbitMQ servers: a fresh schema, a fresh exchange prefix,
// both removed when the test ends. A server that cannot be reached fails the
// test; it never skips it, because CI has the servers. NewLeastPrivilege
// sets up the RabbitMQ users docs/rabbitmq-permissions.md describes, parsed
// from that document, in a vhost of the test's own.
package testenv
