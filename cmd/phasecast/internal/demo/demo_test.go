package demo_test

import (
	"bytes"
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/cmd/phasecast/internal/demo"
	"github.com/phasecast/phasecast/internal/amqpx"
	"github.com/phasecast/phasecast/internal/testenv"
)

// TestDemoTwice runs the demo twice in a row against the test servers:
// both runs succeed with no failed query, drop the columns, and leave
// neither their schemas nor their AMQP names behind.
func TestDemoTwice(t *testing.T) {
	db := testenv.DB(t)
	holdHeavyLock(t, db)
	for run := range 2 {
		name := testenv.Name("t")
		storeSchema, appSchema, prefix := "phasecast_demo_"+name, "demo_"+name, "phasecast_demo_"+name
		// Should a run fail half-way, its leftovers still go.
		t.Cleanup(func() {
			testenv.DropSchema(t, db, storeSchema)
			testenv.DropSchema(t, db, appSchema)
		})

		var out bytes.Buffer
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		rep, err := demo.Run(ctx, demo.Options{
			Agents: 5, Workers: 1, Name: name, Out: &out,
			DatabaseURL: testenv.DatabaseURL(), AMQPURL: testenv.AMQPURL(),
		})
		cancel()
		require.NoError(t, err, "run %d:\n%s", run, out.String())
		require.Equal(t, 5, rep.Agents)
		require.Zero(t, rep.Failed, out.String())
		require.Positive(t, rep.Queries)
		require.Equal(t, 5, rep.AckLatency.N, "every agent acknowledged")
		table := `"` + appSchema + `"."instances"`
		require.Equal(t, []string{table + `."name"`, table + `."display_name"`}, rep.Dropped)
		require.Equal(t, []string{"id", "host", "common_name"}, rep.ColumnsLeft)
		require.Equal(t, "complete", rep.Contract.Outcome)
		require.Contains(t, out.String(), "ok: every agent acknowledged before the drop, and not one query failed")

		var schemas []string
		require.NoError(t, db.Select(&schemas, `SELECT nspname FROM pg_namespace WHERE nspname IN ($1, $2)`, storeSchema, appSchema))
		require.Empty(t, schemas, "run %d left its schemas behind", run)
		requireTopologyGone(t, prefix)
	}
}

// TestDemoWithPython runs the demo with two Python services beside three
// Go ones: the Python agents' acknowledgements gate the drop too, their
// queries are counted apart, and not one of the phasecast run's failed.
func TestDemoWithPython(t *testing.T) {
	db := testenv.DB(t)
	holdHeavyLock(t, db)
	name := testenv.Name("t")
	storeSchema, appSchema := "phasecast_demo_"+name, "demo_"+name
	t.Cleanup(func() {
		testenv.DropSchema(t, db, storeSchema)
		testenv.DropSchema(t, db, appSchema)
	})

	var out bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	rep, err := demo.Run(ctx, demo.Options{
		Agents: 3, Workers: 1, Python: 2, Name: name, Out: &out,
		DatabaseURL: testenv.DatabaseURL(), AMQPURL: testenv.AMQPURL(),
	})
	require.NoError(t, err, out.String())
	require.Equal(t, 5, rep.Agents, "three Go and two Python services")
	require.Equal(t, 5, rep.AckLatency.N, "every agent, Go and Python, acknowledged")
	require.Equal(t, 2, rep.Python.Agents)
	require.Positive(t, rep.Python.Queries, out.String())
	require.Zero(t, rep.Python.Failed, out.String())
	require.Greater(t, rep.Queries, rep.Python.Queries, "the fleet's count holds the Go services' queries too")
	require.Zero(t, rep.Failed, out.String())
	require.Equal(t, "complete", rep.Contract.Outcome)
	require.Equal(t, []string{"id", "host", "common_name"}, rep.ColumnsLeft)
	require.Empty(t, rep.Ungated.Error, out.String())
	require.Equal(t, 2, rep.Ungated.Python.Agents, "the run without the gate had the Python services too")
	require.Positive(t, rep.Ungated.Python.Queries)
	require.Contains(t, out.String(), "2 Python services started")
	require.Contains(t, out.String(), fmt.Sprintf("of which Python    %d queries run, 0 failed (2 services)", rep.Python.Queries))
	requireTopologyGone(t, "phasecast_demo_"+name)
}

// requireTopologyGone checks that the exchange and status queue of an
// AMQP prefix are gone.
func requireTopologyGone(t *testing.T, prefix string) {
	t.Helper()
	requireGone(t, func(ch *amqp.Channel) error {
		return ch.ExchangeDeclarePassive(amqpx.StateExchange(prefix), amqp.ExchangeFanout, false, false, false, false, nil)
	})
	requireGone(t, func(ch *amqp.Channel) error {
		_, err := ch.QueueDeclarePassive(amqpx.StatusQueue(prefix), true, false, false, false, nil)
		return err
	})
}

// requireGone checks that a passive declaration fails with 404 NOT_FOUND.
func requireGone(t *testing.T, declare func(*amqp.Channel) error) {
	t.Helper()
	ch, err := testenv.AMQP(t).Channel()
	require.NoError(t, err)
	defer func() { _ = ch.Close() }()
	err = declare(ch)
	var aerr *amqp.Error
	require.ErrorAs(t, err, &aerr, "still there")
	require.Equal(t, amqp.NotFound, aerr.Code, aerr.Error())
}

// heavyLock is the PostgreSQL advisory lock that tests holding many
// database connections take across test processes (see e2eHeavyLock in
// integration/helpers_test.go): go test runs packages in parallel, and the
// demo beside the integration tests' twenty services would overrun the
// default max_connections (100).
const heavyLock = "phasecast-tests:connection-heavy"

// holdHeavyLock waits for the lock and holds it until the test ends.
func holdHeavyLock(t *testing.T, db *sqlx.DB) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c, err := db.Connx(ctx)
	require.NoError(t, err)
	_, err = c.ExecContext(ctx, `SELECT pg_advisory_lock(hashtext($1))`, heavyLock)
	require.NoError(t, err, "waiting for a connection-heavy test of another package to finish")
	t.Cleanup(func() {
		_, _ = c.ExecContext(context.Background(), `SELECT pg_advisory_unlock(hashtext($1))`, heavyLock)
		_ = c.Close()
	})
}
