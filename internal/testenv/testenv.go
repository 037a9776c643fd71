package testenv

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"
	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/amqpx"
	"github.com/phasecast/phasecast/internal/config"
	"github.com/phasecast/phasecast/internal/pgadmin"
	"github.com/phasecast/phasecast/internal/wire"
	"github.com/phasecast/phasecast/schema"
)

// DatabaseURL is the server the tests use: PHASECAST_DATABASE_URL, or the
// default that docker-compose.yml and this machine provide.
func DatabaseURL() string { return config.Env(config.EnvDatabaseURL, config.DefaultDatabaseURL) }

// AMQPURL is the broker the tests use: PHASECAST_AMQP_URL, or the default.
func AMQPURL() string { return config.Env(config.EnvAMQPURL, config.DefaultAMQPURL) }

// Name returns a short unique name with prefix, safe as an identifier and
// as an AMQP name.
func Name(prefix string) string {
	b := make([]byte, 5)
	_, _ = rand.Read(b)
	return prefix + "_" + hex.EncodeToString(b)
}

// DB opens the test database and closes it when the test ends.
func DB(t testing.TB) *sqlx.DB {
	t.Helper()
	db, err := sqlx.Open("postgres", DatabaseURL())
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	require.NoError(t, db.PingContext(ctx), "PostgreSQL must be running at %s (start it with 'docker compose up -d' or .ci/run)", config.Redact(DatabaseURL()))
	t.Cleanup(func() { db.Close() })
	return db
}

// Store returns a migrated store in a schema of its own, dropped with
// everything in it when the test ends.
func Store(t testing.TB) *schema.Store {
	t.Helper()
	db := DB(t)
	name := Name("pct")
	store, err := schema.NewStore(db, name)
	require.NoError(t, err)
	ctx := context.Background()
	_, err = store.Migrate(ctx)
	require.NoError(t, err)
	t.Cleanup(func() { DropSchema(t, db, name) })
	AllowTestPrincipals(t, store)
	return store
}

// AllowTestPrincipals lets the tests' own database role and broker user
// (the ones DatabaseURL and AMQPURL name) enrol agents of every service,
// as an operator's 'phasecast agents allow' would: the tests run with
// per-agent identity on.
func AllowTestPrincipals(t testing.TB, store *schema.Store) {
	t.Helper()
	ctx := context.Background()
	require.NoError(t, store.AllowOwnRole(ctx, schema.AnyService, "testenv"))
	if user := amqpx.URLUser(AMQPURL()); user != "" {
		require.NoError(t, store.AllowPrincipal(ctx, schema.AnyService, schema.PrincipalAMQP, user, "testenv"))
	}
}

// Credentials gives a test status what an agent process's statuses carry:
// an incarnation (if it has none, one named for the agent) and the token
// of that incarnation, derived from the agent ID and the incarnation so
// that a test's statuses for one agent process agree with each other.
func Credentials(st wire.Status) wire.Status {
	if st.Incarnation == "" {
		st.Incarnation = "test-" + st.AgentID
	}
	sum := sha256.Sum256([]byte("phasecast test token\x00" + st.AgentID + "\x00" + st.Incarnation))
	st.Token = hex.EncodeToString(sum[:])
	return st
}

// Agent records an agent in the store as a status from it would: id, the
// releases its code knows and the epoch it applied and drained, with a
// lease of lease.
func Agent(t testing.TB, store *schema.Store, id string, releases []string, drained int64, lease time.Duration) {
	t.Helper()
	st := wire.Status{V: wire.StatusVersion, Kind: wire.KindStatus, AgentID: id, Service: "svc", Host: "test", PID: 1, Version: "test",
		Releases: releases, Seq: uint64(time.Now().UnixNano()), AppliedEpoch: drained, DrainedEpoch: drained, SentAt: time.Now()}
	st = Credentials(st)
	_, recorded, err := store.RecordStatuses(context.Background(), []wire.Status{st}, lease)
	require.NoError(t, err)
	require.Equal(t, []string{id}, recorded, "the store recorded the status of %s", id)
}

// Schema creates an empty schema of the test's own, dropped with
// everything in it when the test ends, and returns its name: a lower-case
// identifier, so SQL and manifests spell it unquoted.
func Schema(t testing.TB, db *sqlx.DB, prefix string) string {
	t.Helper()
	name := Name(prefix)
	_, err := db.Exec(`CREATE SCHEMA ` + pq.QuoteIdentifier(name))
	require.NoError(t, err)
	t.Cleanup(func() { DropSchema(t, db, name) })
	return name
}

// DropSchema drops a schema and everything in it.
func DropSchema(t testing.TB, db *sqlx.DB, name string) {
	t.Helper()
	require.NoError(t, pgadmin.DropSchemas(context.Background(), db, name))
}

// EnvLog names the level at which components log to stderr while a test
// runs (debug, info, warn); unset, they log nothing.
const EnvLog = "PHASECAST_TEST_LOG"

// Logger is the components' logger for a test, as EnvLog sets it.
func Logger() zerolog.Logger {
	v := os.Getenv(EnvLog)
	level, err := zerolog.ParseLevel(v)
	if err != nil || v == "" {
		return zerolog.Nop()
	}
	return zerolog.New(zerolog.ConsoleWriter{Out: os.Stderr, TimeFormat: "15:04:05.000"}).Level(level).With().Timestamp().Logger()
}

// AMQP dials the test broker and closes the connection when the test ends.
func AMQP(t testing.TB) *amqp.Connection {
	t.Helper()
	conn, err := amqp.Dial(AMQPURL())
	require.NoError(t, err, "RabbitMQ must be running at %s (start it with 'docker compose up -d' or .ci/run)", config.Redact(AMQPURL()))
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

// Prefix returns an exchange prefix of the test's own. The exchanges and
// the durable status queue it names are deleted when the test ends.
func Prefix(t testing.TB) string {
	t.Helper()
	prefix := Name("pct")
	conn := AMQP(t)
	t.Cleanup(func() {
		ch, err := conn.Channel()
		if err != nil {
			return
		}
		defer ch.Close()
		amqpx.DeleteTopology(ch, prefix, nil, nil)
	})
	return prefix
}
