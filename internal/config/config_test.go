package config

import (
	"errors"
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

func TestRedactUnparsableURL(t *testing.T) {
	got := Redact("postgres://u:s3cret@[bad/x")
	require.NotContains(t, got, "s3cret")
}

func TestRedactError(t *testing.T) {
	conn := "postgres://u:s3cret@db/x?sslmode=disable"
	err := RedactError(errors.New(`pq: bad connection "`+conn+`" near s3cret`), conn)
	require.NotContains(t, err.Error(), "s3cret")
	require.Contains(t, err.Error(), "u:xxxxx@db")

	plain := errors.New("connection refused")
	require.Same(t, plain, RedactError(plain, conn), "an error without secrets is returned as is")
	require.NoError(t, RedactError(nil, conn))

	kv := "host=db password='a b c' user=u"
	require.NotContains(t, RedactError(errors.New("bad: "+kv), kv).Error(), "a b c")
}

func TestWithApplicationName(t *testing.T) {
	got, err := WithApplicationName("postgres://u@db/x?sslmode=disable", "phasecast:a")
	require.NoError(t, err)
	require.Equal(t, "postgres://u@db/x?application_name=phasecast%3Aa&sslmode=disable", got)

	kept, err := WithApplicationName("postgres://u@db/x?application_name=mine", "phasecast")
	require.NoError(t, err)
	require.Contains(t, kept, "application_name=mine")

	kv, err := WithApplicationName("host=db user=u", "it's")
	require.NoError(t, err)
	require.Equal(t, `host=db user=u application_name='it\'s'`, kv)
}
