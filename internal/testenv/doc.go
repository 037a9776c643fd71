// Package testenv gives each test its own isolated corner of the real
// PostgreSQL and RabbitMQ servers: a fresh schema, a fresh exchange prefix,
// both removed when the test ends. A server that cannot be reached fails the
// test; it never skips it, because CI has the servers.
package testenv
