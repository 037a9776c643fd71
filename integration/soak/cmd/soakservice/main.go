// Command soakservice is the service the soak test runs as processes of
// their own, so that they can be killed with SIGKILL and frozen with
// SIGSTOP: an agent (with or without a store handle) and workers that
// query the soak's tables using only the pinned snapshot's columns. Every
// unit of work is appended to a history file (integration/soak.Event):
// its agent, snapshot epoch, table and columns, start, end, outcome and
// SQLSTATE; so is every snapshot the agent swaps in. On SIGTERM it stops
// its workers, then its agent, and exits 0. It exits by itself if the
// process that started it goes away.
package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/lib/pq"

	"github.com/phasecast/phasecast/agent"
	"github.com/phasecast/phasecast/integration/soak"
	"github.com/phasecast/phasecast/internal/config"
	"github.com/phasecast/phasecast/internal/retry"
	"github.com/phasecast/phasecast/schema"
)

func main() {
	path := flag.String("config", "", "the service's configuration (JSON, integration/soak.ServiceConfig)")
	flag.Parse()
	if err := run(*path); err != nil {
		fmt.Fprintln(os.Stderr, "soakservice:", err)
		os.Exit(1)
	}
}

func run(path string) error {
	raw, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var cfg soak.ServiceConfig
	if err := json.Unmarshal(raw, &cfg); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	hist, err := soak.CreateHistory(cfg.History)
	if err != nil {
		return err
	}
	defer hist.Close()

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	ctx, orphaned := context.WithCancel(ctx)
	defer orphaned()
	go watchParent(ctx, orphaned)

	appName := agent.DefaultApplicationName(cfg.ID)
	workURL, err := config.WithApplicationName(cfg.WorkURL, appName)
	if err != nil {
		return err
	}
	workDB, err := sql.Open("postgres", workURL)
	if err != nil {
		return err
	}
	defer workDB.Close()
	workDB.SetMaxOpenConns(cfg.Workers)
	workDB.SetMaxIdleConns(cfg.Workers)
	var storeDB *sql.DB
	if cfg.StoreURL != "" {
		storeURL, err := config.WithApplicationName(cfg.StoreURL, appName)
		if err != nil {
			return err
		}
		if storeDB, err = sql.Open("postgres", storeURL); err != nil {
			return err
		}
		defer storeDB.Close()
		storeDB.SetMaxOpenConns(2)
		storeDB.SetMaxIdleConns(1)
	}

	var histErr atomic.Pointer[error]
	record := func(e soak.Event) {
		if err := hist.Write(e); err != nil {
			histErr.CompareAndSwap(nil, &err)
		}
	}
	a, err := agent.New(agent.Config{
		Service: cfg.Service, ID: cfg.ID, Version: "soak", Releases: cfg.Releases, Tables: cfg.Tables,
		DB: storeDB, Schema: cfg.Schema, AMQPURL: cfg.AMQPURL, ExchangePrefix: cfg.Prefix,
		HeartbeatInterval: cfg.HeartbeatInterval, LeaseMargin: cfg.LeaseMargin,
		InitialLease: cfg.InitialLease, ConfirmInterval: cfg.ConfirmInterval, ApplicationName: appName,
		Insecure: true, // the soak's broadcasters run with --insecure
		OnChange: func(_, s *agent.Snapshot) {
			record(soak.Event{Kind: soak.EventApply, At: soak.Now(), Epoch: s.Epoch()})
		},
	})
	if err != nil {
		return err
	}
	started := soak.Now()
	startCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	err = a.Start(startCtx)
	cancel()
	if err != nil {
		return fmt.Errorf("start agent: %w", err)
	}
	record(soak.Event{Kind: soak.EventStart, At: started, Agent: cfg.ID, PID: os.Getpid(), HasDB: storeDB != nil, Epoch: a.Snapshot().Epoch()})

	s := &service{cfg: cfg, agent: a, db: workDB, record: record}
	for _, name := range slices.Sorted(maps.Keys(cfg.Tables)) {
		s.tables = append(s.tables, table{name: name, ref: a.Table(name), quoted: schema.QuoteTable(name), item: slices.Contains(cfg.ItemTables, name)})
	}
	workCtx, stopWork := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for i := range cfg.Workers {
		rng := rand.New(rand.NewPCG(cfg.Seed, uint64(i)))
		wg.Go(func() { s.work(workCtx, rng) })
	}
	<-ctx.Done()
	stopWork()
	wg.Wait()
	stopCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err = a.Stop(stopCtx)
	record(soak.Event{Kind: soak.EventStop, At: soak.Now(), Refused: s.refused.Load()})
	if p := histErr.Load(); p != nil {
		err = errors.Join(err, fmt.Errorf("history: %w", *p))
	}
	return err
}

// watchParent ends the service when the process that started it is gone,
// so that a soak that dies leaves no service running.
func watchParent(ctx context.Context, cancel context.CancelFunc) {
	parent := os.Getppid()
	for retry.Sleep(ctx, 500*time.Millisecond) == nil {
		if os.Getppid() != parent {
			cancel()
			return
		}
	}
}

type table struct {
	name   string
	ref    agent.TableRef
	quoted string
	item   bool // never dropped
}

type service struct {
	cfg     soak.ServiceConfig
	agent   *agent.Agent
	db      *sql.DB
	tables  []table
	record  func(soak.Event)
	units   atomic.Int64
	refused atomic.Int64
}

func (s *service) work(ctx context.Context, rng *rand.Rand) {
	for ctx.Err() == nil {
		g, err := s.agent.Enter()
		if err != nil {
			// Fenced with nothing to re-sync from: the service sheds the
			// work rather than risk naming a dropped column.
			s.refused.Add(1)
			_ = retry.Sleep(ctx, 20*time.Millisecond)
			continue
		}
		snap := g.Snapshot()
		t := s.pick(snap, rng)
		cols := snap.Columns(t.ref)
		unit := s.units.Add(1)
		s.record(soak.Event{Kind: soak.EventBegin, At: soak.Now(), Unit: unit, Epoch: snap.Epoch(), Table: t.name, Columns: cols})
		err = s.unit(ctx, rng, snap, t, cols)
		end := soak.Event{Kind: soak.EventEnd, At: soak.Now(), Unit: unit, Outcome: soak.OutcomeOK}
		g.Exit()
		switch {
		case err != nil && ctx.Err() != nil:
			end.Outcome = soak.OutcomeCancelled
		case err != nil:
			end.Outcome, end.Error = soak.OutcomeError, err.Error()
			var pqErr *pq.Error
			if errors.As(err, &pqErr) {
				end.SQLState = string(pqErr.Code)
			}
		}
		s.record(end)
		_ = retry.Sleep(ctx, s.cfg.Pause/2+time.Duration(rng.Int64N(int64(s.cfg.Pause)+1)))
	}
}

// pick chooses the table of a unit of work: mostly an item table, at
// times one of the tables a release drops whole while the snapshot still
// has it.
func (s *service) pick(snap *agent.Snapshot, rng *rand.Rand) table {
	for range 4 {
		t := s.tables[rng.IntN(len(s.tables))]
		if !snap.TableRemoved(t.ref) {
			return t
		}
	}
	var items []table
	for _, t := range s.tables {
		if t.item {
			items = append(items, t)
		}
	}
	return items[rng.IntN(len(items))]
}

// unit is one request: a read, a pause holding the guard, and a write or
// a second read, both naming the snapshot's columns; half of them in one
// transaction, which also holds the table's lock across the pause.
func (s *service) unit(ctx context.Context, rng *rand.Rand, snap *agent.Snapshot, t table, cols []string) error {
	var q interface {
		ExecContext(context.Context, string, ...any) (sql.Result, error)
		QueryContext(context.Context, string, ...any) (*sql.Rows, error)
	} = s.db
	var tx *sql.Tx
	if rng.IntN(2) == 0 {
		var err error
		if tx, err = s.db.BeginTx(ctx, nil); err != nil {
			return err
		}
		defer func() { _ = tx.Rollback() }()
		q = tx
	}
	read := `SELECT ` + snap.SelectList(t.ref) + ` FROM ` + t.quoted + ` ORDER BY id DESC LIMIT 3`
	if err := drain(q.QueryContext(ctx, read)); err != nil {
		return err
	}
	if s.cfg.Hold > 0 {
		if err := retry.Sleep(ctx, time.Duration(rng.Int64N(int64(s.cfg.Hold)+1))); err != nil {
			return err
		}
	}
	if rng.IntN(2) == 0 {
		if err := drain(q.QueryContext(ctx, read)); err != nil {
			return err
		}
	} else {
		var names, marks []string
		var args []any
		for _, c := range cols {
			if c == "id" {
				continue
			}
			names = append(names, pq.QuoteIdentifier(c))
			args = append(args, s.cfg.ID)
			marks = append(marks, "$"+strconv.Itoa(len(args)))
		}
		if _, err := q.ExecContext(ctx, `INSERT INTO `+t.quoted+` (`+strings.Join(names, ", ")+`) VALUES (`+strings.Join(marks, ", ")+`)`, args...); err != nil {
			return err
		}
	}
	if tx != nil {
		return tx.Commit()
	}
	return nil
}

func drain(rows *sql.Rows, err error) error {
	if err != nil {
		return err
	}
	for rows.Next() {
	}
	return errors.Join(rows.Err(), rows.Close())
}
