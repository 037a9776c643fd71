package pgadmin

import (
	"context"
	"errors"

	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"
)

// DropSchemas drops each named schema and everything in it, if it exists,
// and returns the errors joined.
func DropSchemas(ctx context.Context, db *sqlx.DB, names ...string) error {
	var errs []error
	for _, n := range names {
		if _, err := db.ExecContext(ctx, `DROP SCHEMA IF EXISTS `+pq.QuoteIdentifier(n)+` CASCADE`); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
