package schema_test

import (
	"context"
	"database/sql"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lib/pq"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/schema"
)

// stallBound is what the tests below allow a live read to stall behind
// the DROP at the defaults. The goal is 100ms; the bound leaves room for a
// loaded CI machine, and each test logs the figure it saw.
const stallBound = 300 * time.Millisecond

// TestContractDropDoesNotQueueBehindLongTransaction: with a long
// transaction holding a lock on the table, the runner's DROP does not wait
// in the lock queue, where every read of the table would wait behind it; it
// goes through once the transaction ends.
func TestContractDropDoesNotQueueBehindLongTransaction(t *testing.T) {
	t.Parallel()
	b, _ := setupAcked(t, "a")

	const hold = 2500 * time.Millisecond
	released := commitAfter(b.holdLock(), hold)

	readers := startReaders(t, b, 2, 0)
	queue := watchLockQueue(t, b)

	start := time.Now()
	res, err := b.store.Contract(b.ctx, "L", fast(schema.ContractOptions{}))
	took := time.Since(start)
	readers.stop()
	waited := queue.stop()
	<-released
	require.NoError(t, err)
	t.Logf("took %s, %d attempts (%d held off), %d reads, longest read %s, longest wait of an ACCESS EXCLUSIVE request in the lock queue %s",
		took.Round(time.Millisecond), res.Attempts, res.HeldOff, readers.reads.Load(), readers.longest(), waited)
	require.Equal(t, schema.OutcomeComplete, res.Outcome)
	require.GreaterOrEqual(t, took, hold-100*time.Millisecond, "the DROP cannot go before the transaction ends")
	require.Greater(t, readers.reads.Load(), int64(50))
	// The default lock_timeout is 50ms; the rest is sampling and load.
	require.Less(t, waited, 250*time.Millisecond, "the DROP queued for its lock past its lock_timeout")
	require.Less(t, readers.longest(), stallBound, "reads stalled behind the DROP")
	require.Equal(t, []string{"instances.id", "instances.common_name"}, b.columns())
}

// TestContractDropNotStarvedByShortTransactions: a steady stream of short
// transactions that keeps the table always locked does not starve the
// DROP, nor do its reads stall long behind it.
func TestContractDropNotStarvedByShortTransactions(t *testing.T) {
	t.Parallel()
	b, _ := setupAcked(t, "a")

	readers := startReaders(t, b, 6, 5*time.Millisecond)
	// Let the stream settle so the table is busy when the DDL begins.
	require.Eventually(t, func() bool { return readers.reads.Load() > 30 }, 10*time.Second, 5*time.Millisecond)

	res, err := b.store.Contract(b.ctx, "L", fast(schema.ContractOptions{}))
	readers.stop()
	require.NoError(t, err)
	ddl := res.DDLEnd.Sub(res.DDLStart)
	t.Logf("DDL phase %s, %d attempts (%d held off), %d short transactions, longest %s",
		ddl.Round(time.Millisecond), res.Attempts, res.HeldOff, readers.reads.Load(), readers.longest())
	require.Equal(t, schema.OutcomeComplete, res.Outcome)
	require.Less(t, ddl, 5*time.Second, "the stream of short transactions starved the DROP")
	require.Less(t, readers.longest(), stallBound, "short transactions stalled behind the DROP")
	require.Equal(t, []string{"instances.id", "instances.common_name"}, b.columns())
}

// TestContractDropNotStarvedByLongerTransactions: a steady stream of
// transactions each longer than the lock_timeout, overlapping so that one
// open longer than lock_timeout nearly always holds the table, does not
// starve the DROP either: the runner sees them end one after another and
// lengthens its lock_timeout until it can wait one out.
func TestContractDropNotStarvedByLongerTransactions(t *testing.T) {
	t.Parallel()
	b, _ := setupAcked(t, "a")

	const hold = 150 * time.Millisecond // 3× the default lock_timeout
	readers := startReaders(t, b, 6, hold)
	require.Eventually(t, func() bool { return readers.reads.Load() > 12 }, 10*time.Second, 5*time.Millisecond)

	res, err := b.store.Contract(b.ctx, "L", fast(schema.ContractOptions{DDLTimeout: 30 * time.Second}))
	readers.stop()
	require.NoError(t, err)
	ddl := res.DDLEnd.Sub(res.DDLStart)
	t.Logf("DDL phase %s, %d attempts (%d held off), %d transactions of %s, longest %s",
		ddl.Round(time.Millisecond), res.Attempts, res.HeldOff, readers.reads.Load(), hold, readers.longest())
	require.Equal(t, schema.OutcomeComplete, res.Outcome)
	require.Less(t, ddl, 10*time.Second, "the stream of transactions starved the DROP")
	// Waiting one out takes up to its length; a stall of the old default
	// lock_timeout, 2s, is what the runner must stay under.
	require.Less(t, readers.longest(), hold+time.Second, "transactions stalled behind the DROP")
	require.Equal(t, []string{"instances.id", "instances.common_name"}, b.columns())
}

// commitAfter commits the transaction open on conn after d; the channel
// closes then.
func commitAfter(conn *sql.Conn, d time.Duration) <-chan struct{} {
	released := make(chan struct{})
	go func() {
		defer close(released)
		time.Sleep(d)
		_, _ = conn.ExecContext(context.Background(), `COMMIT`)
	}()
	return released
}

// readerLoop is live traffic on the instances table: each reader reads a
// column the release keeps, in a loop, and the longest read is kept.
type readerLoop struct {
	wg    sync.WaitGroup
	done  chan struct{}
	reads atomic.Int64
	max   atomic.Int64
}

// startReaders starts n readers on connections of their own. With a
// positive hold, each read is a transaction: BEGIN; SELECT; pg_sleep(hold);
// COMMIT, timed whole; otherwise a single SELECT and a 2ms pause.
func startReaders(t *testing.T, b *contractBundle, n int, hold time.Duration) *readerLoop {
	t.Helper()
	db, err := sql.Open("postgres", testenv.DatabaseURL())
	require.NoError(t, err)
	t.Cleanup(func() { db.Close() })
	r := &readerLoop{done: make(chan struct{})}
	t.Cleanup(r.stop)
	read := `SELECT common_name FROM ` + pq.QuoteIdentifier(b.app) + `.instances WHERE id = $1`
	for w := range n {
		conn, err := db.Conn(b.ctx)
		require.NoError(t, err)
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			defer conn.Close()
			for i := 0; ; i++ {
				select {
				case <-r.done:
					return
				default:
				}
				start := time.Now()
				var err error
				if hold > 0 {
					err = readTransaction(b.ctx, conn, read, 1+(i*n+w)%100, hold)
				} else {
					var v sql.NullString
					err = conn.QueryRowContext(b.ctx, read, 1+(i*n+w)%100).Scan(&v)
				}
				if err != nil {
					t.Errorf("reader %d: %v", w, err)
					return
				}
				r.reads.Add(1)
				if l := time.Since(start).Nanoseconds(); l > r.max.Load() {
					r.max.Store(l)
				}
				if hold == 0 {
					time.Sleep(2 * time.Millisecond)
				}
			}
		}()
	}
	return r
}

func readTransaction(ctx context.Context, conn *sql.Conn, read string, id int, hold time.Duration) error {
	if _, err := conn.ExecContext(ctx, `BEGIN`); err != nil {
		return err
	}
	var v sql.NullString
	if err := conn.QueryRowContext(ctx, read, id).Scan(&v); err != nil {
		_, _ = conn.ExecContext(ctx, `ROLLBACK`)
		return err
	}
	if _, err := conn.ExecContext(ctx, `SELECT pg_sleep($1)`, hold.Seconds()); err != nil {
		_, _ = conn.ExecContext(ctx, `ROLLBACK`)
		return err
	}
	_, err := conn.ExecContext(ctx, `COMMIT`)
	return err
}

func (r *readerLoop) stop() {
	select {
	case <-r.done:
	default:
		close(r.done)
	}
	r.wg.Wait()
}

func (r *readerLoop) longest() time.Duration { return time.Duration(r.max.Load()) }

// lockQueueWatch samples pg_locks every few milliseconds for an ACCESS
// EXCLUSIVE request on the instances table that is waiting, and keeps the
// longest stretch one backend was seen waiting.
type lockQueueWatch struct {
	done    chan struct{}
	stopped chan struct{}
	longest time.Duration
}

func watchLockQueue(t *testing.T, b *contractBundle) *lockQueueWatch {
	t.Helper()
	w := &lockQueueWatch{done: make(chan struct{}), stopped: make(chan struct{})}
	table := pq.QuoteIdentifier(b.app) + `.instances`
	go func() {
		defer close(w.stopped)
		since := map[int]time.Time{}
		for {
			select {
			case <-w.done:
				return
			case <-time.After(3 * time.Millisecond):
			}
			var pids []int64
			err := b.db.SelectContext(b.ctx, &pids, `SELECT pid FROM pg_locks
				WHERE locktype = 'relation' AND relation = to_regclass($1) AND mode = 'AccessExclusiveLock' AND NOT granted`, table)
			if err != nil {
				continue // the table is gone once the DROP committed
			}
			now := time.Now()
			waiting := map[int]time.Time{}
			for _, p := range pids {
				first, ok := since[int(p)]
				if !ok {
					first = now
				}
				waiting[int(p)] = first
				w.longest = max(w.longest, now.Sub(first))
			}
			since = waiting
		}
	}()
	t.Cleanup(func() { w.stop() })
	return w
}

func (w *lockQueueWatch) stop() time.Duration {
	select {
	case <-w.done:
	default:
		close(w.done)
	}
	<-w.stopped
	return w.longest
}

// TestContractCascadeHoldsOffForDependentsHolder: with cascade, the runner
// locks the dependents' relations under the table's lock, so a long
// transaction holding one of them (a table whose foreign key references a
// removed column) holds it off too, instead of making reads of the table
// wait while it holds the table.
func TestContractCascadeHoldsOffForDependentsHolder(t *testing.T) {
	t.Parallel()
	b, _ := setupAckedRelease(t, "a", `
release: L
removed:
  - table: APP.instances
    columns: [name, display_name]
    cascade: true
`)
	b.exec(`ALTER TABLE APP.instances ADD CONSTRAINT instances_name_key UNIQUE (name)`,
		`CREATE TABLE APP.child (id int, instance_name text CONSTRAINT child_fk REFERENCES APP.instances (name))`)

	blocker, err := b.db.Conn(b.ctx)
	require.NoError(t, err)
	t.Cleanup(func() { blocker.Close() })
	_, err = blocker.ExecContext(b.ctx, `BEGIN`)
	require.NoError(t, err)
	_, err = blocker.ExecContext(b.ctx, `SELECT count(*) FROM `+pq.QuoteIdentifier(b.app)+`.child`)
	require.NoError(t, err)
	const hold = 1500 * time.Millisecond
	released := commitAfter(blocker, hold)
	readers := startReaders(t, b, 2, 0)

	start := time.Now()
	res, err := b.store.Contract(b.ctx, "L", fast(schema.ContractOptions{}))
	took := time.Since(start)
	readers.stop()
	<-released
	require.NoError(t, err)
	t.Logf("took %s, %d attempts (%d held off), %d reads, longest %s", took.Round(time.Millisecond), res.Attempts, res.HeldOff, readers.reads.Load(), readers.longest())
	require.Equal(t, schema.OutcomeComplete, res.Outcome)
	require.Positive(t, res.HeldOff)
	require.GreaterOrEqual(t, took, hold-100*time.Millisecond)
	require.Less(t, readers.longest(), stallBound, "reads stalled behind the DROP")
	require.Equal(t, []string{"child.id", "child.instance_name", "instances.id", "instances.common_name"}, b.columns())
}
