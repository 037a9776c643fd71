// Package demo runs phasecast end to end in one process, against real
// PostgreSQL and RabbitMQ: a broadcaster, N instances of the novalike
// example service with live workers, and a release driven through expand →
// migrate (with a backfill) → contract → complete while the workers keep
// reading and writing. It prints a timeline and a summary, and succeeds only
// if the removed columns are gone and not one query failed.
//
// The demo works in schemas and AMQP names of its own and removes them
// afterwards, so it can run repeatedly against shared servers.
package demo
