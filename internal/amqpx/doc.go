// Package amqpx holds the AMQP plumbing the broadcaster and the agent
// share: the names of phasecast's exchanges and queues, their declaration,
// and a reconnect loop with capped exponential backoff and jitter.
//
// phasecast runs its own reconnect loop rather than amqp091-go's built-in
// recovery: after any reconnect an agent must re-sync its state before it
// trusts it, its server-named queue changes name, and an unconfirmed
// publish must be sent again. Each of these wants to see the reconnect, not
// have it hidden.
package amqpx
