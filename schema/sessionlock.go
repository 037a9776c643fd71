package schema

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"

	"github.com/lib/pq"
)

// ErrTransactionPooler means a database session turned out to be shared
// with other clients, as a transaction pooler (PgBouncer in transaction or
// statement mode, and the like) shares one server session among many: a
// session-level advisory lock or a LISTEN does not stay with the process
// that took it there.
var ErrTransactionPooler = errors.New("the database session is shared with other clients: a transaction pooler is in the way")

// ErrLockLost means a session lock's connection answered but no longer
// holds the lock.
var ErrLockLost = errors.New("the session no longer holds its advisory lock")

// PoolerError says what showed that a session is shared, and what to do.
type PoolerError struct {
	What   string // "the contract lock", "the leader lock", "LISTEN"
	Detail string // what was seen
}

func (e *PoolerError) Error() string {
	return fmt.Sprintf("%s: %s: %v (PgBouncer in transaction or statement mode, or the like); "+
		"connect the broadcaster and the contract runner to PostgreSQL directly or through session pooling "+
		"(agents may stay behind the transaction pooler, with binary_parameters=yes): see docs/deploying.md",
		e.What, e.Detail, ErrTransactionPooler)
}

func (e *PoolerError) Unwrap() error { return ErrTransactionPooler }

// advisoryHeld is the condition, on pg_locks, that the current backend
// holds the advisory lock hashtext($1). A single bigint key is stored as
// classid (high half) and objid (low half) with objsubid 1.
const advisoryHeld = `EXISTS (
	SELECT 1 FROM pg_locks
	WHERE locktype = 'advisory' AND granted AND pid = pg_backend_pid() AND objsubid = 1
	  AND ((classid::bigint << 32) | objid::bigint) = hashtext($1)::bigint)`

// tryLockQuery takes the lock only on the backend pid $2 that the previous
// statement ran on, and only if that backend does not hold it already: a
// fresh session never does, so a backend that does is shared with another
// client of a pooler, and advisory locks are re-entrant, so taking it again
// there would let two holders each believe they are alone. CASE tries its
// branches in order.
const tryLockQuery = `SELECT pg_backend_pid(), CASE
	WHEN pg_backend_pid() <> $2 THEN 'moved'
	WHEN ` + advisoryHeld + ` THEN 'shared'
	WHEN pg_try_advisory_lock(hashtext($1)) THEN 'locked'
	ELSE 'busy' END`

// verifyLockQuery reports the backend a statement ran on and whether it
// holds the lock.
const verifyLockQuery = `SELECT pg_backend_pid(), ` + advisoryHeld

// unlockOnQuery releases the lock only if the statement runs on backend
// $2, the one that holds it; elsewhere it does nothing (NULL).
const unlockOnQuery = `SELECT CASE WHEN pg_backend_pid() = $2 THEN pg_advisory_unlock(hashtext($1)) END`

// reachQuery, on another connection, reports whether it reached backend
// $2, and if it did releases the lock $1 there.
const reachQuery = `SELECT pg_backend_pid() = $2, CASE WHEN pg_backend_pid() = $2 THEN pg_advisory_unlock(hashtext($1)) END`

// reachAttempts bounds how many statements try to reach a lock's backend
// again, through its connection and the pool, once a pooler moved the
// session away from it.
const reachAttempts = 20

// SessionLock is a session-level advisory lock proven to be held by the
// backend of one dedicated connection. The broadcaster's leader lock and
// the contract runner's lock are SessionLocks.
type SessionLock struct {
	store *Store
	conn  *sql.Conn
	key   string
	what  string
	pid   int // the backend that holds the lock
}

// TryLockSession tries for the session-level advisory lock of purpose
// (Store.LockKey) on conn, a connection taken out of the store's pool for
// as long as the lock is wanted. ok is false when another session holds
// it. It proves the lock is held by conn's own server session: the lock is
// taken only on the backend the previous statement ran on, and then
// another connection of the pool must not reach that backend while conn
// is idle (PgBouncer hands an idle server session to the next client that
// asks), and conn's next statement must run on it and see the lock in
// pg_locks. Anything else is a *PoolerError, and then the lock, if it was
// taken, has been released where it could be reached. what names the lock
// in errors. The caller closes conn after an error (Discard), never pools
// it.
func (s *Store) TryLockSession(ctx context.Context, conn *sql.Conn, purpose, what string) (l *SessionLock, ok bool, err error) {
	l = &SessionLock{store: s, conn: conn, key: s.LockKey(purpose), what: what}
	if err := conn.QueryRowContext(ctx, `SELECT pg_backend_pid()`).Scan(&l.pid); err != nil {
		return nil, false, err
	}
	var pid int
	var outcome string
	if err := conn.QueryRowContext(ctx, tryLockQuery, l.key, l.pid).Scan(&pid, &outcome); err != nil {
		return nil, false, l.poolerOr(ctx, err, false)
	}
	switch outcome {
	case "busy":
		return nil, false, nil
	case "moved":
		return nil, false, l.pooler(fmt.Sprintf("consecutive statements on one connection ran on backends %d and %d", l.pid, pid))
	case "shared":
		return nil, false, l.pooler(fmt.Sprintf("the connection's server session (backend %d) already held the lock, taken there by another client", pid))
	}
	// Locked on l.pid. Could another client reach that session now?
	var reached, released sql.NullBool
	if err := s.db.QueryRowContext(ctx, reachQuery, l.key, l.pid).Scan(&reached, &released); err != nil {
		return nil, false, l.poolerOr(ctx, err, true)
	}
	if reached.Bool {
		// That statement ran on l.pid and released the lock there.
		return nil, false, l.released(l.pooler(fmt.Sprintf("another connection reached backend %d, which holds the lock for this one", l.pid)), released.Bool)
	}
	if err := l.Verify(ctx); err != nil {
		if errors.Is(err, ErrTransactionPooler) {
			err = l.release(ctx, err)
		}
		// Otherwise the connection failed or lost the lock; the caller
		// closes it, which ends the session and any lock it held.
		return nil, false, err
	}
	return l, true, nil
}

// PID is the server backend that holds the lock.
func (l *SessionLock) PID() int { return l.pid }

// Verify proves the lock is still held where it was taken: a statement on
// the lock's connection runs on the same backend, and pg_locks shows the
// lock held by it. Errors: *PoolerError when the statement ran on another
// backend, ErrLockLost when the backend no longer holds the lock, or the
// connection's error.
func (l *SessionLock) Verify(ctx context.Context) error {
	var pid int
	var held bool
	if err := l.conn.QueryRowContext(ctx, verifyLockQuery, l.key).Scan(&pid, &held); err != nil {
		return l.poolerOr(ctx, err, false)
	}
	switch {
	case pid != l.pid:
		return l.pooler(fmt.Sprintf("the lock was taken on backend %d, but its connection's statements now run on backend %d", l.pid, pid))
	case !held:
		return fmt.Errorf("%s (backend %d): %w", l.what, l.pid, ErrLockLost)
	}
	return nil
}

// Release releases the lock on its own backend. If that fails, or the
// statement ran elsewhere, it returns an error and closes the connection.
// Closing is the safe move: PostgreSQL releases a session's locks when the
// session ends, so a direct or session-pooled connection that could not
// unlock still lets the lock go, whereas a session returned to the pool
// still holding the lock would hold it for whoever gets it next, and every
// later runner or broadcaster would find it taken with nobody running. (A
// transaction pooler keeps its server session when the client closes,
// which is why TryLockSession refuses one up front.)
func (l *SessionLock) Release(ctx context.Context) error {
	var released sql.NullBool
	err := l.conn.QueryRowContext(ctx, unlockOnQuery, l.key, l.pid).Scan(&released)
	switch {
	case err != nil:
		if perr := l.poolerOr(ctx, err, true); perr != err {
			err = fmt.Errorf("releasing %s: %w", l.what, perr)
		} else {
			err = fmt.Errorf("releasing %s failed: %w; its connection was closed, which releases it", l.what, err)
		}
	case !released.Valid:
		err = l.release(ctx, l.pooler(fmt.Sprintf("the release ran on another backend than %d, which holds the lock", l.pid)))
	case !released.Bool:
		err = fmt.Errorf("releasing %s: backend %d did not hold it: %w; its connection was closed", l.what, l.pid, ErrLockLost)
	default:
		return nil
	}
	Discard(l.conn)
	return err
}

// release is the clean-up after the session turned out to be shared while
// holding the lock: statements on the connection and on the pool try to
// reach the lock's backend and release it there. cause is returned, with
// what became of the lock.
func (l *SessionLock) release(ctx context.Context, cause error) error {
	for i := range reachAttempts {
		var q queryer = l.conn
		if i%2 == 1 {
			q = l.store.db
		}
		var released sql.NullBool
		if err := q.QueryRowContext(ctx, unlockOnQuery, l.key, l.pid).Scan(&released); err == nil && released.Valid {
			return l.released(cause, released.Bool)
		}
		if ctx.Err() != nil {
			break
		}
	}
	return fmt.Errorf("%w; the lock could not be released and stays with the pooler's server session, backend %d, until the pooler closes it (or run SELECT pg_terminate_backend(%d) when no transaction runs there)",
		cause, l.pid, l.pid)
}

// released adds to cause what a statement that reached the lock's backend
// found: the lock released there, or already gone.
func (l *SessionLock) released(cause error, released bool) error {
	if released {
		return fmt.Errorf("%w (the lock was released on backend %d)", cause, l.pid)
	}
	return fmt.Errorf("%w (backend %d no longer held the lock)", cause, l.pid)
}

// pooler builds the PoolerError for this lock.
func (l *SessionLock) pooler(detail string) error { return &PoolerError{What: l.what, Detail: detail} }

// poolerOr turns SQLSTATE 26000 (an unnamed prepared statement that does
// not exist) into a PoolerError: lib/pq prepares and runs a statement with
// parameters in two exchanges, and only a pooler that hands the second to
// another server session loses it in between. When locked, the lock may
// have been taken and is released where it can be reached.
func (l *SessionLock) poolerOr(ctx context.Context, err error, locked bool) error {
	var pqErr *pq.Error
	if !errors.As(err, &pqErr) || pqErr.Code != "26000" {
		return err
	}
	perr := l.pooler(fmt.Sprintf("a statement lost its prepared form between two messages (%v)", err))
	if locked {
		return l.release(ctx, perr)
	}
	return perr
}

// queryer is what the clean-up runs statements on: the lock's connection
// or the pool.
type queryer interface {
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
}

// Discard closes conn's session instead of returning it to the pool.
func Discard(conn *sql.Conn) {
	_ = conn.Raw(func(any) error { return driver.ErrBadConn })
}
