package novalike

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"
	"github.com/rs/zerolog"

	"github.com/phasecast/phasecast/agent"
	"github.com/phasecast/phasecast/internal/config"
	"github.com/phasecast/phasecast/internal/retry"
	"github.com/phasecast/phasecast/schema"
)

// Columns is every column the service's model knows for its table, old and
// new. The agent removes from this list what the current phase hides.
var Columns = []string{"id", "name", "display_name", "common_name", "host"}

// Config configures one service instance.
type Config struct {
	// Service names the service in status and in the runner's output.
	// Defaults to "novalike".
	Service string
	// DatabaseURL is the service's own database. Required.
	DatabaseURL string
	// Table is the instances table, optionally schema-qualified, spelled
	// as in the release manifest. Defaults to "instances".
	Table string
	// Workers run queries concurrently. Defaults to 4.
	Workers int
	// Pause is each worker's think time between queries, so that a fleet
	// of instances on one machine loads it like real services rather than
	// spinning. Defaults to 5ms; negative means none.
	Pause time.Duration
	// Releases the service's code was built for. Defaults to ["L"].
	Releases []string
	// Agent carries the agent's connection settings (AMQPURL, Schema,
	// ExchangePrefix, intervals, keys). Service, Releases, Tables, DB and
	// ApplicationName are filled in here.
	Agent agent.Config
	// Logger defaults to a no-op logger.
	Logger zerolog.Logger
}

// Result is what an instance reports when it stops.
type Result struct {
	Service string `json:"service"`
	ID      string `json:"id"`
	Queries int64  `json:"queries"`
	Failed  int64  `json:"failed"`
	// Refused counts units of work the agent refused with ErrStale: the
	// service did not run them, so they are not failures.
	Refused int64 `json:"refused"`
	Epoch   int64 `json:"epoch"`
}

// Service is one running instance.
type Service struct {
	cfg   Config
	db    *sqlx.DB
	agent *agent.Agent
	table agent.TableRef
	// quoted is cfg.Table quoted for SQL, once rather than per query.
	quoted string

	workers sync.WaitGroup
	cancel  context.CancelFunc // stops the workers

	stopOnce sync.Once
	stopErr  error

	queries, failed, refused atomic.Int64
	mu                       sync.Mutex // guards failures
	failures                 []error
}

// New opens the service's database and builds its agent. Its database
// sessions carry the agent's application_name, so the contract runner can
// tell them from sessions nobody vouches for.
func New(cfg Config) (*Service, error) {
	if cfg.Service == "" {
		cfg.Service = "novalike"
	}
	if cfg.Table == "" {
		cfg.Table = "instances"
	}
	if cfg.Workers <= 0 {
		cfg.Workers = 4
	}
	if cfg.Pause == 0 {
		cfg.Pause = 5 * time.Millisecond
	}
	if cfg.Releases == nil {
		cfg.Releases = []string{"L"}
	}
	if cfg.DatabaseURL == "" {
		return nil, errors.New("novalike: DatabaseURL is required")
	}
	ac := cfg.Agent
	ac.Service = cfg.Service
	ac.Releases = cfg.Releases
	ac.Tables = map[string][]string{cfg.Table: Columns}
	if ac.ID == "" {
		ac.ID = agent.NewID(cfg.Service)
	}
	ac.ApplicationName = agent.DefaultApplicationName(ac.ID)
	ac.Logger = cfg.Logger
	dsn, err := config.WithApplicationName(cfg.DatabaseURL, ac.ApplicationName)
	if err != nil {
		return nil, err
	}
	db, err := sqlx.Open("postgres", dsn)
	if err != nil {
		return nil, err
	}
	db.SetMaxOpenConns(cfg.Workers + 1)
	db.SetMaxIdleConns(cfg.Workers + 1)
	ac.DB = db.DB
	a, err := agent.New(ac)
	if err != nil {
		db.Close()
		return nil, err
	}
	return &Service{cfg: cfg, db: db, agent: a, table: a.Table(cfg.Table), quoted: schema.QuoteTable(cfg.Table)}, nil
}

// Agent returns the service's embedded agent.
func (s *Service) Agent() *agent.Agent { return s.agent }

// Start starts the agent and then the workers: the service serves only
// once its agent holds the current state. The workers run until Stop.
func (s *Service) Start(ctx context.Context) error {
	if err := s.agent.Start(ctx); err != nil {
		s.db.Close()
		return fmt.Errorf("start agent: %w", err)
	}
	workCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	s.cancel = cancel
	for range s.cfg.Workers {
		s.workers.Go(func() { s.work(workCtx) })
	}
	return nil
}

// Stop stops the workers, then the agent, closes the database and
// reports. ctx bounds the agent's graceful stop. Only the first call
// stops anything; later calls report the same result.
func (s *Service) Stop(ctx context.Context) (Result, error) {
	s.stopOnce.Do(func() {
		if s.cancel != nil {
			s.cancel()
		}
		s.workers.Wait()
		err := s.agent.Stop(ctx)
		s.stopErr = errors.Join(err, s.db.Close())
	})
	return s.Result(), s.stopErr
}

// Run is Start, then Stop once ctx is done: the shape of a service's main.
func (s *Service) Run(ctx context.Context) (Result, error) {
	if err := s.Start(ctx); err != nil {
		return Result{}, err
	}
	<-ctx.Done()
	stopCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), stopTimeout)
	defer cancel()
	return s.Stop(stopCtx)
}

// Result reports the counters so far.
func (s *Service) Result() Result {
	return Result{
		Service: s.cfg.Service,
		ID:      s.agent.ID(),
		Queries: s.queries.Load(),
		Failed:  s.failed.Load(),
		Refused: s.refused.Load(),
		Epoch:   s.agent.Snapshot().Epoch(),
	}
}

// Failures returns the first failures seen, for diagnosis.
func (s *Service) Failures() []error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]error(nil), s.failures...)
}

func (s *Service) work(ctx context.Context) {
	for ctx.Err() == nil {
		g, err := s.agent.Enter()
		if err != nil {
			// Fenced with no database to re-sync from: refuse the work
			// rather than risk naming a dropped column.
			s.refused.Add(1)
			if retry.Sleep(ctx, 20*time.Millisecond) != nil {
				return
			}
			continue
		}
		err = s.query(ctx, g.Snapshot())
		g.Exit()
		if err != nil && ctx.Err() == nil {
			s.failed.Add(1)
			s.mu.Lock()
			if len(s.failures) < 5 {
				s.failures = append(s.failures, err)
			}
			s.mu.Unlock()
		}
		if err == nil {
			s.queries.Add(1)
		}
		if s.cfg.Pause > 0 && retry.Sleep(ctx, s.cfg.Pause) != nil {
			return
		}
	}
}

// query runs one read or write using only the snapshot's columns.
func (s *Service) query(ctx context.Context, snap *agent.Snapshot) error {
	table := s.quoted
	switch rand.IntN(3) {
	case 0:
		cols := snap.Columns(s.table)
		var names, marks []string
		var args []any
		name := "vm-" + strconv.Itoa(rand.IntN(1_000_000))
		for _, c := range cols {
			if c == "id" {
				continue
			}
			names = append(names, pq.QuoteIdentifier(c))
			args = append(args, valueFor(c, name))
			marks = append(marks, fmt.Sprintf("$%d", len(args)))
		}
		_, err := s.db.ExecContext(ctx, fmt.Sprintf(`INSERT INTO %s (%s) VALUES (%s)`, table, strings.Join(names, ", "), strings.Join(marks, ", ")), args...)
		return err
	default:
		rows, err := s.db.QueryContext(ctx, fmt.Sprintf(`SELECT %s FROM %s ORDER BY id DESC LIMIT 5`, snap.SelectList(s.table), table))
		if err != nil {
			return err
		}
		for rows.Next() {
		}
		return errors.Join(rows.Err(), rows.Close())
	}
}

// stopTimeout bounds the agent's graceful stop once the workers are done.
const stopTimeout = 10 * time.Second

// valueFor gives every name-like column the same value, the way a service
// in the migrate phase writes old and new columns alike.
func valueFor(column, name string) any {
	if column == "host" {
		host, _ := os.Hostname()
		return host
	}
	return name
}
