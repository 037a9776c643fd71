package agent

import (
	"crypto/ed25519"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/rs/zerolog"

	"github.com/phasecast/phasecast/internal/amqpx"
	"github.com/phasecast/phasecast/internal/config"
	"github.com/phasecast/phasecast/schema"
)

// Config configures an Agent. Only Service is required.
type Config struct {
	// Service names the service the agent is embedded in ("nova-api").
	// Required.
	Service string

	// ID identifies this agent in the store and on the wire; at most 200
	// bytes. Give each process its own: while one process holds an ID with
	// a live lease, a second one started under it stays fenced and the
	// store reports the conflict. Defaults to NewID(Service):
	// "<service>-<host>-<pid>-<random4hex>".
	ID string

	// Host is reported in status. Defaults to os.Hostname().
	Host string

	// Version is the service's code version, reported in status.
	Version string

	// Releases lists the releases this code was built for, reported in
	// status. The contract runner counts an agent's ack for release L only
	// if the agent knows L. Snapshots hide the removals of every release in
	// contract or later, known or not: hiding is always the safer side.
	Releases []string

	// Tables maps every table the service queries through Columns and
	// SelectList to every column its model knows, e.g.
	// "instances": {"id", "name", "display_name", "common_name"}. Table
	// names are spelled as in manifests: "instances" or "nova.instances".
	// A removal matches a table only when spelled the same way.
	Tables map[string][]string

	// DB is optional: a PostgreSQL handle (lib/pq, or pgx through its
	// stdlib driver) on the database that holds the store's schema. With
	// it, Start loads state from the store, state messages are confirmed
	// against the store before anything is applied (a forged state changes
	// nothing), a fenced Enter re-syncs from the store, and
	// acknowledgements reach the store even without the broker. The agent
	// never closes it. It keeps no state in a database session (one
	// transaction or one statement at a time), so DB may go through a
	// transaction pooler such as PgBouncer in transaction mode; lib/pq
	// needs binary_parameters=yes there (docs/deploying.md).
	DB *sql.DB

	// Schema is the store's PostgreSQL schema. Defaults to "phasecast".
	Schema string

	// AMQPURL is the broker: one URL, or a comma-separated list of a
	// cluster's nodes, tried in turn in an order shuffled for each agent
	// (so a fleet spreads over the nodes), moving to the next one when
	// its node is lost. A comma in a password must be percent-encoded.
	// Defaults to "amqp://guest:guest@localhost:5672/".
	AMQPURL string

	// Connection, if set, is an AMQP connection this agent shares with
	// other agents in the same process (NewSharedConnection); the agent
	// opens its own channels and queue on it, and AMQPURL is not used. A
	// service with one agent leaves it nil: the agent then dials and owns
	// a connection of its own. The agent never closes it.
	Connection *SharedConnection

	// ExchangePrefix prefixes the state exchange and the status queue.
	// Defaults to "phasecast".
	ExchangePrefix string

	// HeartbeatInterval is how often the agent sends a status as a
	// heartbeat, besides the one at start and each ack. Keep it well under
	// the broadcaster's lease. Defaults to 2s.
	HeartbeatInterval time.Duration

	// StatusConfirmTimeout bounds the wait for the broker's confirm of a
	// status (statuses are published with publisher confirms). A status
	// the broker nacks, returns as unroutable, or does not confirm in time
	// is logged and counted (Stats.UnconfirmedStatuses), and the agent
	// drops its connection and reconnects, to the next node of AMQPURL
	// when it lists several. With a DB the status goes through the store
	// at once; without one, the first status of the new connection
	// carries the agent's newest state, which says all the lost one did.
	// Defaults to 2s.
	StatusConfirmTimeout time.Duration

	// LeaseMargin is subtracted from every lease, to cover clock-rate
	// differences and scheduling delay between the lease running out and
	// the agent noticing. Defaults to 1s.
	LeaseMargin time.Duration

	// InitialLease is the lease the agent registers through the store
	// before any grant has told it the broadcaster's lease length (Start
	// with a DB, or a fenced Enter before the first grant). Defaults to 10s.
	InitialLease time.Duration

	// ConfirmInterval bounds how often, with a DB, state messages make the
	// agent read the store: a burst of confirmBurst reads, then one per
	// interval, so a flood of state messages cannot hammer the database
	// while flips in quick succession (migrate, then contract) are not
	// delayed. Defaults to 100ms.
	ConfirmInterval time.Duration

	// ConfirmSignedStates makes an agent with a DB read the store for
	// every new state, signed or not, as agents did before signed states
	// were trusted. By default, an agent with a DB and a StateKey applies a
	// state message whose signature verifies and whose store_id is the one
	// it read from the store itself, without a read: the broadcaster signs
	// a state only in its relay, right after reading it from the store
	// (Store.State, one statement), and the signature covers the whole
	// body, store_id and epoch included, so a valid signature is the
	// store's word relayed, not the message's. An old signed state changes
	// nothing (only a higher epoch is applied), and a state of another
	// store, or an unsigned one (no StateKey: Insecure), is still
	// confirmed in the store. What the read still protects against is a
	// stolen signing key: with it, someone able to publish to the state
	// exchange could move agents without a DB in any case, and with this
	// default agents with a DB as well. Set it to keep the signing key out
	// of the agents' root of trust, at one store read per agent and flip
	// (BENCHMARKS.md measures both). Defaults to false.
	ConfirmSignedStates bool

	// ApplicationName is reported in status as app_name, so the contract
	// runner can tell the service's database sessions from sessions nobody
	// vouches for. The service should open its own database connections
	// with this application_name (see NewID and DefaultApplicationName);
	// the agent cannot set it on a pool it did not open. At most 63 bytes.
	// Defaults to DefaultApplicationName(ID).
	ApplicationName string

	// OnChange, if set, runs after a new snapshot is swapped in and before
	// the acknowledgement for it is sent, on the agent's drain goroutine:
	// keep it short, as the ack waits for it, and do not call Stop from it.
	// old is the snapshot OnChange last saw (snapshots swapped in quickly
	// may be skipped). It is not called for the first state the agent
	// loads. A panic is recovered and logged.
	OnChange func(old, new *Snapshot)

	// StateKey, if set, is the broadcaster's Ed25519 public key: state and
	// grant messages must then carry a valid wire.SignatureHeader, else
	// they are dropped and counted. Set it in production: without it a
	// grant is not authenticated, and anyone allowed to publish to the
	// agent's queue could extend its lease.
	StateKey ed25519.PublicKey

	// Insecure lets the agent run without StateKey. New refuses a Config
	// with neither: without the key a forged grant, published by anyone
	// who can write to the agent's queue, would extend the agent's lease,
	// and an agent without a DB would apply a forged state. The agent
	// logs InsecureAgentWarning when it starts so.
	Insecure bool

	// StatusMACKey, if set, authenticates status messages with
	// wire.MACHeader (HMAC-SHA256).
	StatusMACKey []byte

	// Logger receives the agent's logs. Defaults to a no-op logger (the
	// zero zerolog.Logger writes nothing).
	Logger zerolog.Logger
}

// Defaults applied by New.
const (
	DefaultHeartbeatInterval    = 2 * time.Second
	DefaultStatusConfirmTimeout = 2 * time.Second
	DefaultLeaseMargin          = time.Second
	DefaultInitialLease         = 10 * time.Second
	DefaultConfirmInterval      = 100 * time.Millisecond
)

// confirmBurst is how many store reads state messages may trigger at once
// before ConfirmInterval applies.
const confirmBurst = 4

// maxIDBytes is the longest agent_id the wire accepts.
const maxIDBytes = 200

// maxApplicationName is PostgreSQL's NAMEDATALEN - 1: longer
// application_names are truncated by the server.
const maxApplicationName = 63

// NewID returns a fresh default agent ID for service:
// "<service>-<host>-<pid>-<random4hex>". A service that opens its database
// with DefaultApplicationName(id) before creating the agent calls it, then
// passes the same id as Config.ID.
func NewID(service string) string { return newID(service, config.Hostname()) }

func newID(service, host string) string {
	return fmt.Sprintf("%s-%s-%d-%s", service, host, os.Getpid(), randomHex(2))
}

// DefaultApplicationName returns the application_name an agent with id
// reports by default: "phasecast:"+id, cut to the 63 bytes PostgreSQL keeps.
func DefaultApplicationName(id string) string {
	return truncateUTF8("phasecast:"+id, maxApplicationName)
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// truncateUTF8 cuts s to at most n bytes without splitting a rune.
func truncateUTF8(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}

// withDefaults returns a copy of c with every unset field defaulted.
func (c Config) withDefaults() Config {
	if c.Host == "" {
		c.Host = config.Hostname()
	}
	if c.ID == "" {
		c.ID = newID(c.Service, c.Host)
	}
	if c.Schema == "" {
		c.Schema = config.DefaultSchema
	}
	if c.AMQPURL == "" {
		c.AMQPURL = config.DefaultAMQPURL
	}
	if c.ExchangePrefix == "" {
		c.ExchangePrefix = config.DefaultExchangePrefix
	}
	if c.HeartbeatInterval == 0 {
		c.HeartbeatInterval = DefaultHeartbeatInterval
	}
	if c.StatusConfirmTimeout == 0 {
		c.StatusConfirmTimeout = DefaultStatusConfirmTimeout
	}
	if c.LeaseMargin == 0 {
		c.LeaseMargin = DefaultLeaseMargin
	}
	if c.InitialLease == 0 {
		c.InitialLease = DefaultInitialLease
	}
	if c.ConfirmInterval == 0 {
		c.ConfirmInterval = DefaultConfirmInterval
	}
	if c.ApplicationName == "" {
		c.ApplicationName = DefaultApplicationName(c.ID)
	}
	return c
}

// validate checks a defaulted Config. Each error names the field and says
// how to fix it.
func (c Config) validate() error {
	var errs []error
	fail := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	switch {
	case c.Service == "":
		fail("Config.Service is required: name the service the agent is embedded in")
	case strings.TrimSpace(c.Service) != c.Service || strings.ContainsFunc(c.Service, isControl):
		fail("Config.Service %q has surrounding spaces or control characters: remove them", c.Service)
	}
	if len(c.ID) > maxIDBytes {
		fail("Config.ID is %d bytes; the limit is %d: set a shorter ID", len(c.ID), maxIDBytes)
	}
	if strings.ContainsFunc(c.ID, isControl) {
		fail("Config.ID %q contains a control character: remove it", c.ID)
	}
	if len(c.ApplicationName) > maxApplicationName {
		fail("Config.ApplicationName is %d bytes; PostgreSQL keeps %d: set a shorter one", len(c.ApplicationName), maxApplicationName)
	}
	if err := schema.ValidateIdentifier(c.Schema); err != nil {
		fail("Config.Schema %q: %v", c.Schema, err)
	}
	if _, err := amqpx.ParseURLs(c.AMQPURL); err != nil {
		fail("Config.AMQPURL: %v: give an amqp:// or amqps:// URL, or a comma-separated list of a cluster's nodes", err)
	}
	if strings.TrimSpace(c.ExchangePrefix) != c.ExchangePrefix {
		fail("Config.ExchangePrefix %q has surrounding spaces: remove them", c.ExchangePrefix)
	}
	if c.HeartbeatInterval < 0 {
		fail("Config.HeartbeatInterval is %s: give a positive interval, or 0 for the default %s", c.HeartbeatInterval, DefaultHeartbeatInterval)
	}
	if c.StatusConfirmTimeout < 0 {
		fail("Config.StatusConfirmTimeout is %s: give a positive bound, or 0 for the default %s", c.StatusConfirmTimeout, DefaultStatusConfirmTimeout)
	}
	if c.LeaseMargin < 0 {
		fail("Config.LeaseMargin is %s: give a positive margin, or 0 for the default %s", c.LeaseMargin, DefaultLeaseMargin)
	}
	if c.InitialLease <= c.LeaseMargin {
		fail("Config.InitialLease %s must be longer than Config.LeaseMargin %s", c.InitialLease, c.LeaseMargin)
	}
	if c.ConfirmInterval < 0 {
		fail("Config.ConfirmInterval is %s: give a positive interval, or 0 for the default %s", c.ConfirmInterval, DefaultConfirmInterval)
	}
	if c.StateKey == nil && !c.Insecure {
		fail("Config.StateKey is required (the broadcaster's public key, state.pub from 'phasecast keys generate'); set Config.Insecure to run without it: " + InsecureAgentWarning)
	}
	if c.StateKey != nil && len(c.StateKey) != ed25519.PublicKeySize {
		fail("Config.StateKey is %d bytes; an Ed25519 public key is %d", len(c.StateKey), ed25519.PublicKeySize)
	}
	if c.StatusMACKey != nil && len(c.StatusMACKey) == 0 {
		fail("Config.StatusMACKey is empty: give a key, or leave it nil for no MAC")
	}
	for _, name := range sortedKeys(c.Tables) {
		if err := validateTableName(name); err != nil {
			fail("Config.Tables[%q]: %v", name, err)
			continue
		}
		cols := c.Tables[name]
		if len(cols) == 0 {
			fail("Config.Tables[%q] lists no columns: list every column the service's model knows", name)
		}
		seen := make(map[string]bool, len(cols))
		for i, col := range cols {
			if err := schema.ValidateIdentifier(col); err != nil {
				fail("Config.Tables[%q][%d] %q: %v", name, i, col, err)
			}
			if seen[col] {
				fail("Config.Tables[%q] lists column %q twice: list it once", name, col)
			}
			seen[col] = true
		}
	}
	return errors.Join(errs...)
}

// validateTableName accepts "table" or "schema.table", each part a valid
// identifier: the spellings a manifest's removals arrive in.
func validateTableName(name string) error {
	parts := strings.Split(name, ".")
	if len(parts) > 2 {
		return errors.New(`more than one dot: spell it "table" or "schema.table", as in the manifests`)
	}
	for _, p := range parts {
		if err := schema.ValidateIdentifier(p); err != nil {
			return fmt.Errorf("part %q: %w", p, err)
		}
	}
	return nil
}

func isControl(r rune) bool { return r < 0x20 || r == 0x7f }

// InsecureAgentWarning names the risk of an agent run without StateKey
// (Config.Insecure).
const InsecureAgentWarning = "INSECURE: without the state public key a forged grant would extend this agent's lease, and without a DB a forged state would be applied"
