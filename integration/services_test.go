package integration

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/lib/pq"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/cmd/phasecast/fleet"
	"github.com/phasecast/phasecast/examples/novalike"
)

// e2eLoad is n novalike services of the test running their workers on
// @app.instances: the traffic a contract must not break.
type e2eLoad struct {
	e        *e2eEnv
	services *fleet.Services
	stopped  bool
}

// startLoad starts n services (nova-api-00 …) with workers each, stopped
// when the test ends, and waits until every one runs queries.
func (e *e2eEnv) startLoad(n, workers int) *e2eLoad {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(e.ctx, 60*time.Second)
	defer cancel()
	services, err := fleet.StartServices(ctx, n, func(i int) novalike.Config {
		return e.serviceConfig(fmt.Sprintf("nova-api-%02d", i), workers)
	})
	require.NoError(e.t, err)
	l := &e2eLoad{e: e, services: services}
	e.t.Cleanup(func() {
		if !l.stopped {
			_, _ = services.Stop(context.Background())
		}
	})
	e2eWaitFor(e.t, e2eWait, "every service to run queries", func() bool {
		for _, s := range services.List {
			if s.Result().Queries == 0 {
				return false
			}
		}
		return true
	})
	return l
}

// queries counts the queries run so far.
func (l *e2eLoad) queries() int64 {
	var n int64
	for _, s := range l.services.List {
		n += s.Result().Queries
	}
	return n
}

// waitQueries waits until the services have run n more queries.
func (l *e2eLoad) waitQueries(n int64) {
	l.e.t.Helper()
	after := l.queries()
	e2eWaitFor(l.e.t, e2eWait, fmt.Sprintf("%d more queries", n), func() bool { return l.queries() >= after+n })
}

// stop stops the services and requires that not one query failed, and
// that PostgreSQL never ran out of connections (max_connections is shared
// with every test process: that would be the environment, not the
// invariant, so it is told apart).
func (l *e2eLoad) stop() fleet.Totals {
	l.e.t.Helper()
	ctx, cancel := context.WithTimeout(l.e.ctx, 30*time.Second)
	defer cancel()
	totals, err := l.services.Stop(ctx)
	l.stopped = true
	require.NoError(l.e.t, err)
	exhausted := 0
	for _, f := range totals.Failures {
		var pqErr *pq.Error
		if errors.As(f, &pqErr) && pqErr.Code == "53300" {
			exhausted++
		}
	}
	require.Zero(l.e.t, exhausted, "PostgreSQL ran out of connections during the test: %v", totals.Failures)
	require.Zero(l.e.t, totals.Failed, "failures: %v", totals.Failures)
	require.Empty(l.e.t, totals.Failures)
	require.Positive(l.e.t, totals.Queries)
	return totals
}
