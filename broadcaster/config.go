package broadcaster

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/rs/zerolog"

	"github.com/phasecast/phasecast/internal/amqpx"
	"github.com/phasecast/phasecast/internal/config"
	"github.com/phasecast/phasecast/schema"
)

// Defaults for the Config fields that have one.
const (
	DefaultBeaconInterval    = 3 * time.Second
	DefaultPollInterval      = time.Second
	DefaultLeaseDuration     = 10 * time.Second
	DefaultLivenessInterval  = time.Second
	DefaultStatusBatchMax    = 1000
	DefaultStatusBatchWait   = 5 * time.Millisecond
	DefaultBrokerLossTimeout = 10 * time.Second
)

// ErrInvalidConfig wraps every problem New finds in a Config.
var ErrInvalidConfig = errors.New("broadcaster: invalid config")

// maxStatusBatch keeps the prefetch (twice the batch) under the 65535 that
// AMQP's basic.qos can carry.
const maxStatusBatch = 30000

// maxNameLen bounds the ID and the exchange prefix, which end up in AMQP
// short strings (255 bytes) together with a suffix.
const maxNameLen = 200

// Config configures a Broadcaster. The zero value of every optional field
// means its default.
type Config struct {
	// Store is the versioning store the broadcaster relays from and records
	// agent statuses into. Required. While leading, the broadcaster keeps
	// one of the store's pooled connections for the leader lock, so a pool
	// limited by SetMaxOpenConns needs room for at least two.
	Store *schema.Store

	// DatabaseURL is the connection string of the store's database. The
	// LISTEN connection needs one of its own (lib/pq's Listener dials it
	// itself), so it must name the same database as Store. Required. It is
	// only ever logged redacted.
	DatabaseURL string

	// AMQPURL is the RabbitMQ broker: one URL, or a comma-separated list
	// of a cluster's nodes. Each connection tries them in turn, in an
	// order shuffled per process, and moves to the next node when its
	// node is lost. A comma in a password must be percent-encoded.
	// Defaults to config.DefaultAMQPURL.
	AMQPURL string

	// ExchangePrefix names the state exchange and the status queue
	// (amqpx.StateExchange, amqpx.StatusQueue). Defaults to
	// config.DefaultExchangePrefix.
	ExchangePrefix string

	// ID names this broadcaster in the store's broadcasters table, in logs
	// and in the broker's connection names. Defaults to
	// "<host>-<pid>-<random>".
	ID string

	// BeaconInterval is how often the leader re-publishes the whole state
	// although nothing changed, so an agent that missed a message catches
	// up. Any publish restarts the interval. Defaults to 3s.
	BeaconInterval time.Duration

	// PollInterval is how often the leader checks the outbox for epochs not
	// yet published. It is the safety net under LISTEN/NOTIFY, whose
	// notifications are lost while the listening connection is down.
	// Defaults to 1s.
	PollInterval time.Duration

	// LeaseDuration is the lease granted with each recorded status, on the
	// database clock. Defaults to 10s.
	LeaseDuration time.Duration

	// LivenessInterval is how often every broadcaster writes its liveness
	// row, how often the leader checks the connection that holds its lock,
	// and how often a standby tries to take the lock. Defaults to 1s.
	LivenessInterval time.Duration

	// BrokerLossTimeout is how long a leader may go without a broker to
	// publish to and consume from (every node of AMQPURL lost, or nacks
	// and confirm timeouts) before it steps down: it releases the leader
	// lock so that a standby that reaches a broker takes over, writes its
	// liveness row as not leading meanwhile, and contends again once a
	// broker answers. Defaults to 10s.
	BrokerLossTimeout time.Duration

	// StatusQueueType is the type the status queue is declared with:
	// amqpx.StatusQueueClassic (a non-durable classic queue) or
	// amqpx.StatusQueueQuorum (a durable quorum queue, replicated over a
	// cluster). A status queue that already exists with other arguments
	// (a quorum queue an earlier release declared) is used as it is, and
	// the broadcaster logs that it is. Defaults to
	// amqpx.StatusQueueClassic, the faster (BENCHMARKS.md); see
	// docs/rabbitmq-cluster.md for a cluster.
	StatusQueueType string

	// StatusBatchMax is the most statuses recorded in one transaction.
	// Defaults to 1000.
	StatusBatchMax int

	// StatusBatchWait is how long a batch of statuses waits to fill after
	// its first status arrived. Defaults to 5ms.
	StatusBatchWait time.Duration

	// StatusBatchGap closes a batch before StatusBatchWait when no further
	// status has arrived for this long, so a lone status (one agent's
	// acknowledgement) is recorded almost at once instead of waiting out
	// StatusBatchWait, while a burst (a fleet acknowledging a flip) still
	// fills its batch. Defaults to StatusBatchWait/5 (1ms with the
	// default StatusBatchWait).
	StatusBatchGap time.Duration

	// SigningKey, when set, signs every state and grant (wire.SignatureHeader)
	// so agents holding the public key can tell them from forgeries.
	// Optional.
	SigningKey ed25519.PrivateKey

	// Insecure skips the principal check: any sender may enrol an agent
	// (create its row, or take it over once its lease is over), with or
	// without a user_id. A status still changes an enrolled row only with
	// that row's token. 'phasecast broadcast --insecure' sets it, and
	// refuses to run without a state key otherwise.
	Insecure bool

	// StatusMACKey, when set, makes the broadcaster reject every status
	// without a valid HMAC (wire.MACHeader). Optional.
	StatusMACKey []byte

	// OnRecorded, if set, is called on the status consumer's goroutine
	// each time a batch of statuses has been committed to the store, with
	// the time the commit returned and, for each agent recorded, the
	// status the store kept. It is for measurement and metrics (phasecast
	// bench times acknowledgements with it): keep it short, as the grants
	// and the next batch wait for it. Optional.
	OnRecorded func(at time.Time, recorded []RecordedStatus)

	// MetricsAddr, when set, is the address (host:port, ":0" for any port)
	// on which Start serves the broadcaster's Prometheus metrics at
	// /metrics, until Stop; a listen error fails Start. The registry
	// behind it is Broadcaster.Metrics. Optional.
	MetricsAddr string

	// Logger receives the broadcaster's logs. Defaults to a no-op logger.
	Logger zerolog.Logger
}

// RecordedStatus is what Config.OnRecorded learns of one recorded status.
type RecordedStatus struct {
	AgentID      string
	Seq          uint64
	AppliedEpoch int64
	DrainedEpoch int64
}

// WithDefaults returns a copy of c with every unset optional field set to
// its default.
func (c *Config) WithDefaults() *Config {
	out := *c
	if out.AMQPURL == "" {
		out.AMQPURL = config.DefaultAMQPURL
	}
	if out.ExchangePrefix == "" {
		out.ExchangePrefix = config.DefaultExchangePrefix
	}
	if out.ID == "" {
		out.ID = defaultID()
	}
	if out.BeaconInterval == 0 {
		out.BeaconInterval = DefaultBeaconInterval
	}
	if out.PollInterval == 0 {
		out.PollInterval = DefaultPollInterval
	}
	if out.LeaseDuration == 0 {
		out.LeaseDuration = DefaultLeaseDuration
	}
	if out.LivenessInterval == 0 {
		out.LivenessInterval = DefaultLivenessInterval
	}
	if out.BrokerLossTimeout == 0 {
		out.BrokerLossTimeout = DefaultBrokerLossTimeout
	}
	if out.StatusQueueType == "" {
		out.StatusQueueType = amqpx.StatusQueueClassic
	}
	if out.StatusBatchMax == 0 {
		out.StatusBatchMax = DefaultStatusBatchMax
	}
	if out.StatusBatchWait == 0 {
		out.StatusBatchWait = DefaultStatusBatchWait
	}
	if out.StatusBatchGap == 0 {
		out.StatusBatchGap = max(out.StatusBatchWait/5, time.Microsecond)
	}
	return &out
}

// validate checks a config that went through WithDefaults. Each error
// names the field and what to do about it.
func (c *Config) validate() error {
	var problems []string
	fail := func(format string, args ...any) { problems = append(problems, fmt.Sprintf(format, args...)) }
	if c.Store == nil {
		fail("Config.Store is required: open one with schema.Open")
	}
	if c.DatabaseURL == "" {
		fail("Config.DatabaseURL is required: the LISTEN connection needs the connection string the store was opened with")
	}
	if _, err := amqpx.ParseURLs(c.AMQPURL); err != nil {
		fail("Config.AMQPURL: %v: give an amqp:// or amqps:// URL, or a comma-separated list of a cluster's nodes", err)
	}
	if len(c.ExchangePrefix) > maxNameLen {
		fail("Config.ExchangePrefix must be at most %d bytes", maxNameLen)
	}
	if len(c.ID) > maxNameLen {
		fail("Config.ID must be at most %d bytes", maxNameLen)
	}
	for _, d := range []struct {
		name string
		v    time.Duration
		min  time.Duration
	}{
		{"BeaconInterval", c.BeaconInterval, time.Millisecond},
		{"PollInterval", c.PollInterval, time.Millisecond},
		{"LeaseDuration", c.LeaseDuration, time.Millisecond},
		{"LivenessInterval", c.LivenessInterval, time.Millisecond},
		{"BrokerLossTimeout", c.BrokerLossTimeout, time.Millisecond},
		{"StatusBatchWait", c.StatusBatchWait, time.Microsecond},
		{"StatusBatchGap", c.StatusBatchGap, time.Microsecond},
	} {
		if d.v < d.min {
			fail("Config.%s must be at least %s, or zero for the default (got %s)", d.name, d.min, d.v)
		}
	}
	if c.StatusQueueType != amqpx.StatusQueueClassic && c.StatusQueueType != amqpx.StatusQueueQuorum {
		fail("Config.StatusQueueType must be %q or %q, or empty for the default (got %q)", amqpx.StatusQueueClassic, amqpx.StatusQueueQuorum, c.StatusQueueType)
	}
	if c.StatusBatchMax < 1 || c.StatusBatchMax > maxStatusBatch {
		fail("Config.StatusBatchMax must be between 1 and %d, or zero for the default (got %d)", maxStatusBatch, c.StatusBatchMax)
	}
	if c.SigningKey != nil && len(c.SigningKey) != ed25519.PrivateKeySize {
		fail("Config.SigningKey must be an Ed25519 private key of %d bytes (got %d)", ed25519.PrivateKeySize, len(c.SigningKey))
	}
	if c.StatusMACKey != nil && len(c.StatusMACKey) == 0 {
		fail("Config.StatusMACKey is set but empty: leave it nil to accept statuses without a MAC")
	}
	if len(problems) > 0 {
		return fmt.Errorf("%w: %s", ErrInvalidConfig, strings.Join(problems, "; "))
	}
	return nil
}

// defaultID is "<host>-<pid>-<random>": readable in the broadcasters table,
// and unique even for two broadcasters in one process.
func defaultID() string {
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	return fmt.Sprintf("%s-%d-%s", config.Hostname(), os.Getpid(), hex.EncodeToString(b))
}
