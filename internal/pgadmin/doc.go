// Package pgadmin holds the PostgreSQL housekeeping that the demo, the
// fleet benchmark and the tests share: dropping the schemas a run created.
package pgadmin
