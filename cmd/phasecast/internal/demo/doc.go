// Package demo runs phasecast end to end in one process, against real
// PostgreSQL and RabbitMQ, and shows what the gate is for.
//
// It drives the same release twice, each time on a fleet of its own: a
// broadcaster and N instances of the novalike example service with live
// workers, the release taken through expand → migrate (with a backfill) →
// contract while the workers keep reading and writing. The first run has
// no gate: the columns are dropped right after the flip to contract, as a
// hurried script would, and the queries that then name a dropped column
// are counted. The second contracts through phasecast's runner, which
// drops only once every agent acknowledged. It prints each run's timeline
// and the two side by side, and succeeds only if the phasecast run lost
// no query and dropped the columns; the first run is reported, never
// judged.
//
// Each run works in schemas and AMQP names of its own and removes them
// afterwards, so the demo can run repeatedly against shared servers.
package demo
