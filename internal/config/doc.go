// Package config holds the connection settings every phasecast component
// shares: their defaults, the environment variables that override them, and
// the redaction that keeps passwords out of logs and errors.
package config
