// Package amqpx holds the AMQP plumbing the broadcaster and the agent
// share: the names of phasecast's exchanges and queues, their declaration,
// and the one reconnect loop (Reconnector) that every long-lived connection
// of phasecast runs on, with capped exponential backoff and jitter.
//
// phasecast runs its own reconnect loop rather than amqp091-go's built-in
// recovery, a choice made by testing the latter through a cut connection
// (recovery_test.go): it brings a consumer back, but on a server-named
// queue under a new name the application is never told, so grants sent to
// an agent's queue would be lost until it noticed. Besides, after any
// reconnect an agent must re-sync its state before it trusts it, and an
// unconfirmed publish must be sent again: each of these wants to see the
// reconnect, not have it hidden.
package amqpx
