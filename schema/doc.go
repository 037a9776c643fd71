// Package schema is phasecast's versioning store and contract runner.
//
// The store lives in its own PostgreSQL schema (default "phasecast"),
// created by embedded, versioned migrations applied under an advisory lock.
// It holds releases and their removed() directives, one global epoch, an
// outbox of changes for the broadcaster, an audit log of every flip, and the
// registry of agents with their leases.
//
// Every change (ApplyRelease, Flip, Rollback) is one transaction that bumps
// the epoch first, then writes the phase, the outbox row and the audit row,
// and sends NOTIFY. Readers that must see a consistent state (the
// broadcaster, an agent syncing without the broker) hold the epoch row FOR
// SHARE while they read, so no change can commit halfway through their read.
//
// Manifests are YAML (ParseManifest). Every identifier from a manifest is
// validated and quoted when DDL is generated; only the operator's own expand
// and precondition statements run as written.
package schema
