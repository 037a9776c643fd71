package fleet

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/rs/zerolog"

	"github.com/phasecast/phasecast/agent"
	"github.com/phasecast/phasecast/broadcaster"
	"github.com/phasecast/phasecast/examples/novalike"
	"github.com/phasecast/phasecast/internal/amqpx"
	"github.com/phasecast/phasecast/internal/retry"
	"github.com/phasecast/phasecast/schema"
)

// Env is where a fleet runs: a store, the servers' URLs and an AMQP name
// prefix of its own.
type Env struct {
	Store       *schema.Store
	DatabaseURL string
	AMQPURL     string
	Prefix      string
	Logger      zerolog.Logger
	// StateKey, when set (Secure), signs the broadcaster's states and
	// grants, and its public half is every agent's Config.StateKey.
	// Without it agents run with Config.Insecure.
	StateKey ed25519.PrivateKey
}

// Secure sets the env up as an operator would for production: a fresh
// state key pair ('phasecast keys generate'), and the env's own database
// role and broker user allowed to enrol agents of every service ('phasecast
// agents allow'). The demo and the bench run so, which is why they need no
// keys or principals from the user.
func (e *Env) Secure(ctx context.Context) error {
	if e.StateKey == nil {
		_, priv, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			return err
		}
		e.StateKey = priv
	}
	if err := e.Store.AllowOwnRole(ctx, schema.AnyService, "phasecast"); err != nil {
		return err
	}
	if user := amqpx.URLUser(e.AMQPURL); user != "" {
		return e.Store.AllowPrincipal(ctx, schema.AnyService, schema.PrincipalAMQP, user, "phasecast")
	}
	return nil
}

// BroadcasterConfig returns a broadcaster configuration for the env with
// intervals short enough for demos and tests; callers adjust it further.
func (e *Env) BroadcasterConfig() *broadcaster.Config {
	return &broadcaster.Config{
		Store: e.Store, DatabaseURL: e.DatabaseURL, AMQPURL: e.AMQPURL, ExchangePrefix: e.Prefix,
		BeaconInterval: time.Second, LeaseDuration: 5 * time.Second, LivenessInterval: 500 * time.Millisecond,
		Logger:     e.Logger.With().Str("component", "broadcaster").Logger(),
		SigningKey: e.StateKey,
	}
}

// StartBroadcaster starts a broadcaster and waits until it leads (when
// lead is true) or runs. The caller stops it.
func (e *Env) StartBroadcaster(ctx context.Context, cfg *broadcaster.Config, lead bool) (*broadcaster.Broadcaster, error) {
	b, err := broadcaster.New(cfg)
	if err != nil {
		return nil, err
	}
	if err := b.Start(ctx); err != nil {
		return nil, err
	}
	if lead {
		if err := WaitFor(ctx, 10*time.Second, b.IsLeader); err != nil {
			_ = b.Stop(context.WithoutCancel(ctx))
			return nil, fmt.Errorf("broadcaster did not take the lead: %w", err)
		}
	}
	return b, nil
}

// AgentConfig returns an agent configuration for the env; callers set the
// service, releases and tables.
func (e *Env) AgentConfig() agent.Config {
	cfg := agent.Config{
		AMQPURL: e.AMQPURL, Schema: e.Store.Schema(), ExchangePrefix: e.Prefix,
		HeartbeatInterval: time.Second,
		Logger:            e.Logger.With().Str("component", "agent").Logger(),
	}
	if e.StateKey != nil {
		cfg.StateKey = e.StateKey.Public().(ed25519.PublicKey)
	} else {
		// Tests that forge unsigned states and grants on purpose run so.
		cfg.Insecure = true
	}
	return cfg
}

// ServiceConfig is a novalike configuration for the env.
func (e *Env) ServiceConfig(service, table string, workers int) novalike.Config {
	return novalike.Config{
		Service: service, DatabaseURL: e.DatabaseURL, Table: table, Workers: workers,
		Releases: []string{"L"}, Agent: e.AgentConfig(), Logger: e.Logger,
	}
}

// Services is a set of running novalike instances.
type Services struct {
	List []*novalike.Service
}

// StartServices starts n services concurrently, each configured by
// configure(i). If any fails to start, those started are stopped and the
// errors returned.
func StartServices(ctx context.Context, n int, configure func(i int) novalike.Config) (*Services, error) {
	list := make([]*novalike.Service, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			svc, err := novalike.New(configure(i))
			if err != nil {
				errs[i] = err
				return
			}
			if errs[i] = svc.Start(ctx); errs[i] == nil {
				list[i] = svc
			}
		})
	}
	wg.Wait()
	s := &Services{}
	for _, svc := range list {
		if svc != nil {
			s.List = append(s.List, svc)
		}
	}
	if err := errors.Join(errs...); err != nil {
		_, _ = s.Stop(context.WithoutCancel(ctx))
		return nil, err
	}
	return s, nil
}

// Totals sums the services' reports.
type Totals struct {
	Queries, Failed, Refused int64
	Failures                 []error // the first failures of each service, and stop errors
}

// Stop stops every service (each bounded by ctx) and sums their reports.
// Stopping twice is harmless.
func (s *Services) Stop(ctx context.Context) (Totals, error) {
	var t Totals
	var errs []error
	for _, svc := range s.List {
		r, err := svc.Stop(ctx)
		if err != nil {
			errs = append(errs, err)
		}
		t.Queries += r.Queries
		t.Failed += r.Failed
		t.Refused += r.Refused
		t.Failures = append(t.Failures, svc.Failures()...)
	}
	return t, errors.Join(errs...)
}

// WaitFor polls cond every 10 ms until it holds, limit passes or ctx ends.
func WaitFor(ctx context.Context, limit time.Duration, cond func() bool) error {
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) {
			return fmt.Errorf("condition not met within %s", limit)
		}
		if err := retry.Sleep(ctx, 10*time.Millisecond); err != nil {
			return err
		}
	}
	return nil
}

// DeleteAMQP removes the env's exchange and status queue.
func (e *Env) DeleteAMQP() { e.DeleteTopology(nil, nil) }

// DeleteTopology removes the env's exchange and status queue and the
// further queues and exchanges named, ignoring what is already gone.
func (e *Env) DeleteTopology(queues, exchanges []string) {
	conn, err := amqpx.Dial(e.AMQPURL, "phasecast cleanup")
	if err != nil {
		return
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return
	}
	defer ch.Close()
	amqpx.DeleteTopology(ch, e.Prefix, queues, exchanges)
}
