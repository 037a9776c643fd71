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

// A list of URLs (--amqp-url "$U1,$U2") has every password masked, not
// only the first one's.
func TestRedactMasksEveryURLOfAList(t *testing.T) {
	for _, in := range []string{
		"amqp://a:pw1@h1:5672/,amqp://b:s3cret@h2:5672/",
		"amqp://h1:5672/, amqp://b:s3cret@h2:5672/vh",
		"amqp://a@h1/,amqp://b:s3cret@h2",
		"amqp://a:pw1@h1/amqp://b:s3cret@h2", // a comma forgotten
	} {
		got := Redact(in)
		require.NotContains(t, got, "s3cret", in)
		require.NotContains(t, got, "pw1", in)
		require.Contains(t, got, "b:xxxxx@h2", in)
	}
	require.Equal(t, "amqp://a:xxxxx@h1:5672/,amqp://b:xxxxx@h2:5672/", Redact("amqp://a:pw1@h1:5672/,amqp://b:s3cret@h2:5672/"))
	require.Equal(t, []string{"amqp://h1/", "amqp://h2/"}, SplitURLs(" amqp://h1/ ,, amqp://h2/,"))
}

// Error text from a driver or a broker loses every URL password it
// quotes, whether or not it is the configured one.
func TestScrubErrorTextOfURLUserinfo(t *testing.T) {
	list := "amqp://a:pw1@h1:5681/,amqp://b:s3cret@h2:5682/"
	err := errors.New(`dial amqp://b:s3cret@h2:5682/: dial tcp 127.0.0.1:5682: connect: connection refused; also amqp://c:other@h3/ and password=hunter2`)
	got := RedactError(err, list).Error()
	for _, secret := range []string{"s3cret", "other", "hunter2"} {
		require.NotContains(t, got, secret)
	}
	require.Contains(t, got, "127.0.0.1:5682: connect: connection refused", "the rest of the message survives")
	echoed := RedactError(errors.New("ACCESS_REFUSED - login b/s3cret refused"), list).Error()
	require.NotContains(t, echoed, "s3cret", "a configured password is masked wherever it appears")
}
