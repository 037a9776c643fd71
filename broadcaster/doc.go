// Package broadcaster is phasecast's daemon between the versioning store
// and the agents embedded in every service. It does three things:
//
//   - Relay. Every accepted flip writes an outbox row and sends NOTIFY in
//     the transaction that bumps the epoch. The broadcaster LISTENs, reads
//     the whole state, publishes it to the fanout state exchange on a
//     channel in confirm mode, and marks the outbox published only once
//     the broker has confirmed a state at that epoch. A nack, a confirm
//     timeout or a lost connection mean "not published": the state is sent
//     again. Wakes coalesce, so a burst of flips costs a few publishes, not
//     one each.
//   - Beacons. The whole state is re-published every BeaconInterval, and
//     the outbox is polled every PollInterval, because NOTIFY is lost while
//     the listening connection is down. Agents apply a state only if its
//     epoch is higher than theirs, so duplicates are harmless.
//   - Statuses and grants. Agents send their status (start, every drain,
//     heartbeats) to the durable status queue. The broadcaster checks each
//     one's MAC (when StatusMACKey is set) and decodes it strictly; a bad
//     message is logged, counted in Stats by reason and dropped, and never
//     changes anything. So is a status that names another store than the
//     broadcaster's (schema.Store.ID), or none, or one sent longer ago
//     than LeaseDuration: the queue is named by the prefix alone and may
//     still hold an earlier run's statuses. Good ones are recorded in
//     batches, one transaction per batch (StatusBatchMax,
//     StatusBatchWait), each extending the
//     agent's lease on the database clock. The store records a status only
//     if it carries the token the agent's row is bound to, or if its
//     sender (the user_id RabbitMQ validated) is allowed to enrol agents
//     of its service (schema.Store.RecordSent; Config.Insecure skips that
//     check); anything else is acked, counted as "unauthenticated" and
//     changes nothing. A recorded status is answered
//     with a grant on the grant exchange, routed by the agent ID the store
//     recorded (never by anything the status says) to the agent's own
//     queue, carrying its incarnation, its seq, the lease
//     and the epoch current when it was recorded, unless the agent asked
//     for none (an ack on a fresh lease, wire.Status.SkipGrant) and is not
//     behind that epoch. Deliveries are acked only
//     after the transaction committed; if the database write fails they go
//     back to the queue and the consumer backs off. A replayed status (its
//     seq not newer than the one recorded for its agent's incarnation) is
//     acked without a grant, and so is one from a second live process
//     under an agent ID another incarnation holds (Stats.Rejected
//     "id_conflict"): the store marks that ID conflicted instead.
//
// # Leadership
//
// Several broadcasters may run against one store; one leads. The leader
// holds a PostgreSQL session-level advisory lock, keyed on the store's
// schema, on a connection of its own, and checks that connection every
// LivenessInterval. If the check fails it stops all leader work at once and
// stands by. Standbys try for the lock every LivenessInterval, so a
// standby takes over within about one interval after the leader stops or
// its lock connection dies. Every broadcaster writes a liveness row
// (leader or not) every LivenessInterval; Stop releases the lock and
// removes the row.
//
// Leading also needs a broker. A broadcaster takes the lock only after it
// dialled a node of Config.AMQPURL, and a leader that cannot publish
// (its last state unconfirmed, or no publishing connection) or consume
// for Config.BrokerLossTimeout releases the lock so that a standby that
// reaches a broker leads. Its liveness row says "leader" only while it
// publishes and consumes, so the contract runner never counts a leader
// that is cut off from the agents as alive.
//
// Leadership saves work; it is not what keeps the system correct. In the
// moment between a leader's lock connection dying and that leader
// noticing, two broadcasters may both relay and consume. That is harmless:
// states are idempotent by epoch, the status queue hands each message to
// one consumer, the store ignores a status whose seq is not newer, and
// leases never move earlier, whichever broadcaster's lease length records
// them.
//
// # Failures
//
// The daemon never exits on a failure of its servers. The publishing and
// consuming AMQP connections are separate (a publisher throttled by the
// broker must not stall acks) and each is re-dialled with capped,
// jittered backoff. Database errors, including a terminated session, are
// logged once per streak and retried. Start fails fast, naming what could
// not be reached, on what no retry would fix.
//
// # Metrics
//
// Metrics returns a Prometheus registry of the broadcaster's own (never
// the global one), which Config.MetricsAddr serves at /metrics from Start
// to Stop. Its counters are Stats, read at scrape time; the agents'
// standings and the outbox lag are read from the store at scrape time,
// bounded and cached. The leader also measures each flip it publishes from
// its commit until the store counts every live agent done with it
// (phasecast_flip_convergence_seconds), checking after recorded status
// batches while a flip is unconverged, off the status path.
//
// # Lifecycle
//
// New validates a Config and fills in its defaults. Start returns once the
// broadcaster runs (as leader or standby). Stop is graceful and bounded by
// its context; both are safe to call twice, and Stop joins every goroutine
// the broadcaster started.
package broadcaster
