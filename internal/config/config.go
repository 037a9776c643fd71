package config

import (
	"fmt"
	"net/url"
	"os"
	"strings"
)

// Defaults, as documented in the README.
const (
	DefaultDatabaseURL    = "postgres://postgres@localhost:5432/postgres?sslmode=disable"
	DefaultAMQPURL        = "amqp://guest:guest@localhost:5672/"
	DefaultSchema         = "phasecast"
	DefaultExchangePrefix = "phasecast"
)

// Environment variables that override the defaults; flags override both.
const (
	EnvDatabaseURL    = "PHASECAST_DATABASE_URL"
	EnvAMQPURL        = "PHASECAST_AMQP_URL"
	EnvSchema         = "PHASECAST_SCHEMA"
	EnvExchangePrefix = "PHASECAST_EXCHANGE_PREFIX"
)

// Env returns the environment variable name if set and non-empty, else def.
func Env(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

// WithApplicationName returns dsn, a URL or a key/value string, with its
// application_name set to name, unless it names one already. The contract
// runner tells sessions apart by application_name.
func WithApplicationName(dsn, name string) (string, error) {
	if strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://") {
		u, err := url.Parse(dsn)
		if err != nil {
			return "", fmt.Errorf("database URL %s: %w", Redact(dsn), RedactError(err, dsn))
		}
		q := u.Query()
		if q.Get("application_name") == "" {
			q.Set("application_name", name)
			u.RawQuery = q.Encode()
		}
		return u.String(), nil
	}
	if strings.Contains(dsn, "application_name") {
		return dsn, nil
	}
	return dsn + " application_name='" + strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(name) + "'", nil
}

// Hostname is this machine's name as agents and broadcasters report it, or
// "unknown" when the system will not say.
func Hostname() string {
	h, err := os.Hostname()
	if err != nil || h == "" {
		return "unknown"
	}
	return h
}
