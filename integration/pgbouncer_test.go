package integration

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/lib/pq"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/cmd/phasecast/fleet"
	"github.com/phasecast/phasecast/examples/novalike"
	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/schema"
)

// TestAgentsBehindTransactionPooler: services whose database handle (the
// workers' and the embedded agent's) goes through PgBouncer in transaction
// mode, with lib/pq's binary_parameters=yes as lib/pq needs there, follow
// release L from expand to complete while the broadcaster and the runner
// connect directly. No store read of an agent fails, and no query of the
// services either.
func TestAgentsBehindTransactionPooler(t *testing.T) {
	e := e2eSetup(t)
	e.createInstances()
	e.apply(e2eReleaseL) // expand
	e.startBroadcaster(true, nil)
	pooled := testenv.WithParam(testenv.PgBouncer(t, testenv.PoolTransaction), "binary_parameters", "yes")

	startCtx, cancel := context.WithTimeout(e.ctx, 60*time.Second)
	defer cancel()
	services, err := fleet.StartServices(startCtx, 4, func(i int) novalike.Config {
		cfg := e.serviceConfig(fmt.Sprintf("nova-pooled-%02d", i), 2)
		cfg.DatabaseURL = pooled
		return cfg
	})
	require.NoError(t, err)
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			_, _ = services.Stop(context.Background())
		}
	})
	queries := func() int64 {
		var n int64
		for _, s := range services.List {
			n += s.Result().Queries
		}
		return n
	}
	e2eWaitFor(t, e2eWait, "every service to run queries", func() bool {
		for _, s := range services.List {
			if s.Result().Queries == 0 {
				return false
			}
		}
		return true
	})

	e.toMigrate()
	epoch := e.flipChecked("L")
	res, err := e.store.Contract(e.ctx, "L", schema.ContractOptions{Timeout: 30 * time.Second, PollInterval: 20 * time.Millisecond, LeaderWithin: 5 * time.Second, Actor: "test"})
	require.NoError(t, err)
	require.Equal(t, schema.OutcomeComplete, res.Outcome)
	require.Equal(t, epoch, res.ContractEpoch)
	require.Len(t, res.Acked, 4)
	require.Equal(t, phase.Complete, e.phase("L"))
	after := queries()
	e2eWaitFor(t, e2eWait, "traffic after the drop", func() bool { return queries() >= after+100 })

	var resyncs, resyncFailures int64
	for _, s := range services.List {
		st := s.Agent().Stats()
		resyncs += st.Resyncs + st.DigestConfirms
		resyncFailures += st.ResyncFailures
	}
	stopCtx, cancelStop := context.WithTimeout(e.ctx, 30*time.Second)
	defer cancelStop()
	totals, err := services.Stop(stopCtx)
	stopped = true
	require.NoError(t, err)
	unnamed := 0 // 26000: lib/pq's two-step statements split by the pooler
	for _, f := range totals.Failures {
		var pqErr *pq.Error
		if errors.As(f, &pqErr) && pqErr.Code == "26000" {
			unnamed++
		}
	}
	t.Logf("%d queries through the pooler, %d failed (%d unnamed prepared statement), %d refused; agents: %d store reads, %d failed",
		totals.Queries, totals.Failed, unnamed, totals.Refused, resyncs, resyncFailures)
	require.Zero(t, resyncFailures, "an agent's store read failed behind the pooler")
	require.Positive(t, resyncs)
	require.Zero(t, totals.Failed, "failures: %v", totals.Failures)
	require.Equal(t, []string{"id", "host", "common_name"}, e.columns("instances"))
}
