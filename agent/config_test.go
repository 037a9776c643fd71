package agent

import (
	"crypto/ed25519"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
)

func TestNewDefaults(t *testing.T) {
	a, err := New(Config{Insecure: true, Service: "nova-api"})
	require.NoError(t, err)
	cfg := a.cfg
	require.Regexp(t, `^nova-api-.+-\d+-[0-9a-f]{4}$`, a.ID())
	require.NotEmpty(t, cfg.Host)
	require.Contains(t, a.ID(), "-"+cfg.Host+"-")
	require.Equal(t, "phasecast", cfg.Schema)
	require.Equal(t, "phasecast", cfg.ExchangePrefix)
	require.Equal(t, "amqp://guest:guest@localhost:5672/", cfg.AMQPURL)
	require.Equal(t, 2*time.Second, cfg.HeartbeatInterval)
	require.Equal(t, time.Second, cfg.LeaseMargin)
	require.Equal(t, 10*time.Second, cfg.InitialLease)
	require.Equal(t, 100*time.Millisecond, cfg.ConfirmInterval)
	require.Equal(t, DefaultApplicationName(a.ID()), a.ApplicationName())

	b, err := New(Config{Insecure: true, Service: "nova-api"})
	require.NoError(t, err)
	require.NotEqual(t, a.ID(), b.ID())
}

func TestDefaultApplicationName(t *testing.T) {
	require.Equal(t, "phasecast:svc-1", DefaultApplicationName("svc-1"))
	long := DefaultApplicationName(strings.Repeat("é", 40)) // 80 bytes of é
	require.LessOrEqual(t, len(long), 63)
	require.True(t, strings.HasPrefix(long, "phasecast:é"))
	require.Equal(t, strings.ToValidUTF8(long, "?"), long, "never cut inside a rune")
	require.Regexp(t, `^svc-.+-\d+-[0-9a-f]{4}$`, NewID("svc"))
}

func TestNewValidates(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  Config
		want string
	}{
		{"no service", Config{}, "Config.Service is required"},
		{"service with spaces", Config{Service: " api"}, "Config.Service"},
		{"long id", Config{Service: "s", ID: strings.Repeat("x", 201)}, "Config.ID is 201 bytes"},
		{"long application name", Config{Service: "s", ApplicationName: strings.Repeat("x", 64)}, "Config.ApplicationName is 64 bytes"},
		{"bad schema", Config{Service: "s", Schema: `a"b`}, "Config.Schema"},
		{"bad url", Config{Service: "s", AMQPURL: "http://guest:hunter2@host/"}, "Config.AMQPURL"},
		{"negative heartbeat", Config{Service: "s", HeartbeatInterval: -time.Second}, "Config.HeartbeatInterval"},
		{"negative margin", Config{Service: "s", LeaseMargin: -time.Second}, "Config.LeaseMargin"},
		{"initial lease within margin", Config{Service: "s", InitialLease: time.Second, LeaseMargin: time.Second}, "Config.InitialLease"},
		{"negative confirm interval", Config{Service: "s", ConfirmInterval: -time.Second}, "Config.ConfirmInterval"},
		{"short state key", Config{Service: "s", StateKey: []byte("short")}, "Config.StateKey"},
		{"empty mac key", Config{Service: "s", StatusMACKey: []byte{}}, "Config.StatusMACKey"},
		{"table with two dots", Config{Service: "s", Tables: map[string][]string{"a.b.c": {"id"}}}, `Config.Tables["a.b.c"]`},
		{"empty table name", Config{Service: "s", Tables: map[string][]string{"": {"id"}}}, `Config.Tables[""]`},
		{"table without columns", Config{Service: "s", Tables: map[string][]string{"t": nil}}, "lists no columns"},
		{"bad column", Config{Service: "s", Tables: map[string][]string{"t": {"id", `x"y`}}}, `Config.Tables["t"][1]`},
		{"duplicate column", Config{Service: "s", Tables: map[string][]string{"t": {"id", "id"}}}, `lists column "id" twice`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := New(tc.cfg)
			require.ErrorContains(t, err, tc.want)
			require.NotContains(t, err.Error(), "hunter2")
		})
	}
}

// TestAgentRefusesToRunWithoutStateKey: secure by default. Without the
// broadcaster's public key a forged grant would extend the agent's lease,
// so New refuses unless the caller says Insecure, and then names the risk
// in its log.
func TestAgentRefusesToRunWithoutStateKey(t *testing.T) {
	_, err := New(Config{Service: "nova-api"})
	require.ErrorContains(t, err, "Config.StateKey is required")
	require.ErrorContains(t, err, "a forged grant would extend this agent's lease")

	var logs strings.Builder
	_, err = New(Config{Service: "nova-api", Insecure: true, Logger: zerolog.New(&logs)})
	require.NoError(t, err)
	require.Contains(t, logs.String(), InsecureAgentWarning)
	_, err = New(Config{Service: "nova-api", StateKey: make(ed25519.PublicKey, ed25519.PublicKeySize)})
	require.NoError(t, err)
}
