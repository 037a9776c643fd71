// Package integration holds end-to-end tests of phasecast against real
// PostgreSQL and RabbitMQ: the servers docker-compose.yml starts, or those
// PHASECAST_DATABASE_URL and PHASECAST_AMQP_URL name. A server that cannot
// be reached fails a test; it never skips it.
package integration
