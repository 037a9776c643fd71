package config

import (
	"net/url"
	"os"
	"regexp"
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

// keyValuePassword matches password=… in a libpq key/value connection string.
var keyValuePassword = regexp.MustCompile(`(?i)(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)`)

// Redact returns a connection string safe to log: the password of a URL, or
// the password= of a key/value string, becomes "xxxxx".
func Redact(conn string) string {
	u, err := url.Parse(conn)
	if err == nil && u.Scheme != "" && u.Host != "" {
		if _, has := u.User.Password(); has {
			u.User = url.UserPassword(u.User.Username(), "xxxxx")
		}
		q := u.Query()
		if q.Has("password") {
			q.Set("password", "xxxxx")
			u.RawQuery = q.Encode()
		}
		return u.String()
	}
	return keyValuePassword.ReplaceAllString(conn, "${1}xxxxx")
}
