package config

import (
	"testing"

	"github.com/stretchr/testify/require"
)

func TestRedact(t *testing.T) {
	cases := []struct{ in, want string }{
		{"amqp://guest:guest@localhost:5672/", "amqp://guest:xxxxx@localhost:5672/"},
		{"postgres://postgres@localhost:5432/postgres?sslmode=disable", "postgres://postgres@localhost:5432/postgres?sslmode=disable"},
		{"postgres://u:s3cret@db/x?password=other", "postgres://u:xxxxx@db/x?password=xxxxx"},
		{"host=db user=u password=s3cret dbname=x", "host=db user=u password=xxxxx dbname=x"},
		{"host=db password='a b' dbname=x", "host=db password=xxxxx dbname=x"},
	}
	for _, c := range cases {
		got := Redact(c.in)
		require.Equal(t, c.want, got)
		require.NotContains(t, got, "s3cret")
	}
}

func TestEnv(t *testing.T) {
	t.Setenv("PHASECAST_TEST_X", "")
	require.Equal(t, "def", Env("PHASECAST_TEST_X", "def"))
	t.Setenv("PHASECAST_TEST_X", "set")
	require.Equal(t, "set", Env("PHASECAST_TEST_X", "def"))
}
