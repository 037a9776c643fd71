// Package bench is the fleet benchmark behind 'phasecast bench': for each
// fleet size, in one run against the real servers, it measures
//
//   - phasecast: an in-process broadcaster and N agents (no workers, so an
//     agent drains at once), and the time from a flip's commit in
//     PostgreSQL to the commit of the last agent's acknowledgement in the
//     store, with agents that confirm every state against the store (the
//     secure default) and agents that trust the message;
//   - the floor: the same fan-out and reply with bare amqp091-go and none of
//     phasecast's logic, on the same connection layout: one message to N
//     queues through a fanout exchange, N replies to one queue;
//   - the polling baseline: N pollers reading the store's epoch every
//     poll interval, started at phases spread over the interval, and the
//     time until the last has seen a flip, with the queries per second this
//     costs the database;
//
// and, once, what phasecast costs: the broadcaster's sustained flips per
// second with 100 agents, the statuses it records per second, and an
// agent's heap and goroutines.
//
// # Timing
//
// Every latency starts when store.Flip returns, i.e. when the client has
// the COMMIT's reply, the first moment anyone can know the flip committed.
// An acknowledgement is recorded when the broadcaster's transaction that
// wrote it has committed: the broadcaster reports each committed batch
// through broadcaster.Config.OnRecorded, with the time its COMMIT
// returned, so the measurement reads nothing from the database and adds no
// load. Both ends are therefore "the client saw the COMMIT's reply", on
// the same monotonic clock. Options.AckWatch "poll" instead counts acks
// with one query per millisecond, as an outside observer would, to
// cross-check the hook.
//
// Everything lives in a schema and AMQP names of the run's own, removed
// afterwards.
package bench
