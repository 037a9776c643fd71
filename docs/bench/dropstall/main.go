// Command dropstall measures how long live reads of a table stall behind
// the contract runner's DROP, with pgbench reading a column the release
// keeps while the runner drops two others. Scenario "long": a transaction
// holds a lock on the table for --hold while the runner contracts.
// Scenario "stream": goroutines run transactions on the table (BEGIN;
// SELECT; pg_sleep(--stream-hold, 5ms); COMMIT) so it is always locked. It prints
// one Markdown table row: the reads' max, p99 and p50 latency over the
// run, the reads over 100ms, and the DDL phase's length. docs/bench/
// drop-stall.sh runs it for the old and the new defaults; BENCHMARKS.md
// has the figures.
//
//	go run ./docs/bench/dropstall --scenario long --lock-timeout 0
package main

import (
	"bufio"
	"context"
	"database/sql"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jmoiron/sqlx"
	_ "github.com/lib/pq"

	"github.com/phasecast/phasecast/internal/config"
	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/wire"
	"github.com/phasecast/phasecast/schema"
)

const (
	storeSchema = "dropstall_store"
	appSchema   = "dropstall_app"
	rows        = 10000
)

func main() {
	scenario := flag.String("scenario", "long", "long: a transaction holds the table for --hold; stream: short transactions keep it busy")
	lockTimeout := flag.Duration("lock-timeout", 0, "ContractOptions.LockTimeout (0: the runner's default)")
	hold := flag.Duration("hold", 7*time.Second, "how long the long transaction holds the table")
	duration := flag.Duration("duration", 12*time.Second, "pgbench's run (-T)")
	rate := flag.Int("rate", 200, "pgbench's reads per second (-R), over 4 clients")
	streams := flag.Int("streams", 6, "goroutines running short transactions (stream)")
	streamHold := flag.Duration("stream-hold", 5*time.Millisecond, "each stream transaction's pg_sleep")
	label := flag.String("label", "", "the row's first cell")
	pgbench := flag.String("pgbench", "/usr/bin/pgbench", "pgbench binary")
	flag.Parse()
	if err := run(*scenario, *lockTimeout, *hold, *duration, *rate, *streams, *streamHold, *label, *pgbench); err != nil {
		fmt.Fprintln(os.Stderr, "dropstall:", err)
		os.Exit(1)
	}
}

func run(scenario string, lockTimeout, hold, duration time.Duration, rate, streams int, streamHold time.Duration, label, pgbench string) error {
	ctx := context.Background()
	url := config.Env(config.EnvDatabaseURL, config.DefaultDatabaseURL)
	db, err := sqlx.Open("postgres", url)
	if err != nil {
		return err
	}
	defer db.Close()
	store, err := setup(ctx, db)
	if err != nil {
		return fmt.Errorf("setup: %w", err)
	}
	defer func() { _, _ = db.Exec(`DROP SCHEMA IF EXISTS ` + appSchema + `, ` + storeSchema + ` CASCADE`) }()

	dir, err := os.MkdirTemp("", "dropstall")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	script := filepath.Join(dir, "read.sql")
	if err := os.WriteFile(script, []byte(fmt.Sprintf("\\set id random(1, %d)\nSELECT common_name FROM %s.instances WHERE id = :id;\n", rows, appSchema)), 0o644); err != nil {
		return err
	}
	bench := exec.Command(pgbench, "-n", "-f", script, "-c", "4", "-j", "2", "-R", strconv.Itoa(rate),
		"-T", strconv.Itoa(int(duration.Seconds())), "--log", "--log-prefix", filepath.Join(dir, "tx"), "-d", url)
	bench.Stdout, bench.Stderr = os.Stderr, os.Stderr
	if err := bench.Start(); err != nil {
		return err
	}
	time.Sleep(time.Second) // pgbench's clients connect and settle

	var wg sync.WaitGroup
	stop := make(chan struct{})
	defer func() { close(stop); wg.Wait() }()
	errs := make(chan error, streams+1)
	switch scenario {
	case "long":
		conn, err := db.Conn(ctx)
		if err != nil {
			return err
		}
		defer conn.Close()
		if _, err := conn.ExecContext(ctx, `BEGIN`); err != nil {
			return err
		}
		if _, err := conn.ExecContext(ctx, `SELECT count(*) FROM `+appSchema+`.instances`); err != nil {
			return err
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			time.Sleep(hold)
			_, err := conn.ExecContext(ctx, `COMMIT`)
			errs <- err
		}()
		time.Sleep(500 * time.Millisecond) // the transaction is old when the runner looks
	case "stream":
		for range streams {
			conn, err := db.Conn(ctx)
			if err != nil {
				return err
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer conn.Close()
				for i := 0; ; i++ {
					select {
					case <-stop:
						return
					default:
					}
					if err := streamTransaction(ctx, conn, 1+i%rows, streamHold); err != nil {
						errs <- err
						return
					}
				}
			}()
		}
		time.Sleep(time.Second)
	default:
		return fmt.Errorf("--scenario %q: want long or stream", scenario)
	}

	res, err := store.Contract(ctx, "L", schema.ContractOptions{LockTimeout: lockTimeout, PollInterval: 20 * time.Millisecond, Timeout: time.Minute})
	if err != nil {
		return fmt.Errorf("contract: %w", err)
	}
	if err := bench.Wait(); err != nil {
		return fmt.Errorf("pgbench: %w", err)
	}
	select {
	case err := <-errs:
		if err != nil {
			return err
		}
	default:
	}
	if os.Getenv("DROPSTALL_KEEP") != "" {
		fmt.Fprintf(os.Stderr, "logs in %s; DDL %d.%06d–%d.%06d\n", dir, res.DDLStart.Unix(), res.DDLStart.Nanosecond()/1000, res.DDLEnd.Unix(), res.DDLEnd.Nanosecond()/1000)
		_ = exec.Command("cp", "-r", dir, dir+".kept").Run()
	}
	reads, err := readLogs(dir)
	if err != nil {
		return err
	}
	if len(reads) == 0 {
		return errors.New("pgbench logged no transaction")
	}
	// A read overlapping the DDL phase may have waited behind the DROP;
	// the others give the machine's own noise.
	var during, outside []time.Duration
	for _, r := range reads {
		if r.end.After(res.DDLStart) && r.end.Add(-r.latency).Before(res.DDLEnd) {
			during = append(during, r.latency)
		} else {
			outside = append(outside, r.latency)
		}
	}
	name := scenario
	if scenario == "stream" {
		name = fmt.Sprintf("stream of %s transactions", streamHold)
	} else {
		name = fmt.Sprintf("%s transaction", hold)
	}
	fmt.Printf("| %s | %s | %s | %d | %s | %s | %d | %s | %s | %s | %d |\n", label, name, ms(res.DDLEnd.Sub(res.DDLStart)), res.Attempts,
		ms(quantile(during, 1)), ms(quantile(during, 0.99)), over(during, 100*time.Millisecond), ms(quantile(during, 0.5)),
		ms(quantile(outside, 1)), ms(quantile(outside, 0.99)), len(reads))
	return nil
}

// setup makes a store, the instances table and release L in contracting's
// doorstep: in contract, with a leading broadcaster and one agent that
// acknowledged.
func setup(ctx context.Context, db *sqlx.DB) (*schema.Store, error) {
	if _, err := db.ExecContext(ctx, `DROP SCHEMA IF EXISTS `+appSchema+`, `+storeSchema+` CASCADE`); err != nil {
		return nil, err
	}
	store, err := schema.NewStore(db, storeSchema)
	if err != nil {
		return nil, err
	}
	if _, err := store.Migrate(ctx); err != nil {
		return nil, err
	}
	for _, s := range []string{
		`CREATE SCHEMA ` + appSchema,
		`CREATE TABLE ` + appSchema + `.instances (id int PRIMARY KEY, name text, display_name text, common_name text)`,
		fmt.Sprintf(`INSERT INTO %s.instances SELECT g, 'n' || g, 'd' || g, 'c' || g FROM generate_series(1, %d) g`, appSchema, rows),
		`ANALYZE ` + appSchema + `.instances`,
	} {
		if _, err := db.ExecContext(ctx, s); err != nil {
			return nil, err
		}
	}
	m, err := schema.ParseManifest("L.yaml", []byte("release: L\nremoved:\n  - table: "+appSchema+".instances\n    columns: [name, display_name]\n"))
	if err != nil {
		return nil, err
	}
	if _, err := store.ApplyRelease(ctx, m, "bench"); err != nil {
		return nil, err
	}
	if _, err := store.Flip(ctx, "L", phase.Migrate, schema.FlipOptions{Actor: "bench"}); err != nil {
		return nil, err
	}
	flip, err := store.Flip(ctx, "L", phase.Contract, schema.FlipOptions{Actor: "bench"})
	if err != nil {
		return nil, err
	}
	if err := store.TouchBroadcaster(ctx, schema.Broadcaster{ID: "bench", Host: "bench", PID: os.Getpid(), Leader: true}); err != nil {
		return nil, err
	}
	st := wire.Status{V: wire.Version, Kind: wire.KindStatus, AgentID: "bench", Service: "bench", Host: "bench", PID: os.Getpid(),
		Releases: []string{"L"}, Seq: 1, AppliedEpoch: flip.Epoch, DrainedEpoch: flip.Epoch, SentAt: time.Now()}
	if _, _, err := store.RecordStatuses(ctx, []wire.Status{st}, time.Minute); err != nil {
		return nil, err
	}
	return store, nil
}

func streamTransaction(ctx context.Context, conn *sql.Conn, id int, hold time.Duration) error {
	tx, err := conn.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer func() { _ = tx.Rollback() }()
	var v sql.NullString
	if err := tx.QueryRowContext(ctx, `SELECT common_name FROM `+appSchema+`.instances WHERE id = $1`, id).Scan(&v); err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, `SELECT pg_sleep($1)`, hold.Seconds()); err != nil {
		return err
	}
	return tx.Commit()
}

type read struct {
	end     time.Time
	latency time.Duration
}

// readLogs reads pgbench's per-transaction logs (tx.PID[.N]): client,
// transaction, latency in µs (with -R, schedule lag included), script,
// and the time it ended in seconds and µs.
func readLogs(dir string) ([]read, error) {
	files, err := filepath.Glob(filepath.Join(dir, "tx.*"))
	if err != nil {
		return nil, err
	}
	var reads []read
	for _, name := range files {
		f, err := os.Open(name)
		if err != nil {
			return nil, err
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			if len(fields) < 6 {
				continue
			}
			var v [3]int64
			for i, field := range []string{fields[2], fields[4], fields[5]} {
				if v[i], err = strconv.ParseInt(field, 10, 64); err != nil {
					break
				}
			}
			if err != nil {
				continue // "skipped" under --latency-limit
			}
			reads = append(reads, read{end: time.Unix(v[1], v[2]*1000), latency: time.Duration(v[0]) * time.Microsecond})
		}
		f.Close()
		if err := sc.Err(); err != nil {
			return nil, err
		}
	}
	return reads, nil
}

// quantile returns the q-quantile of lat (1: the max), sorting it.
func quantile(lat []time.Duration, q float64) time.Duration {
	if len(lat) == 0 {
		return 0
	}
	slices.Sort(lat)
	return lat[min(len(lat)-1, int(q*float64(len(lat))))]
}

func over(lat []time.Duration, limit time.Duration) int {
	n := 0
	for _, d := range lat {
		if d > limit {
			n++
		}
	}
	return n
}

func ms(d time.Duration) string { return fmt.Sprintf("%.1f ms", float64(d)/float64(time.Millisecond)) }
