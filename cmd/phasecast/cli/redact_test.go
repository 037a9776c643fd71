package cli

import (
	"bytes"
	"context"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/testenv"
)

// --amqp-url "$U1,$U2" whose nodes cannot be reached: the error names
// both URLs, and no password, the second one's included, is printed.
func TestAMQPURLListNeverPrintsAPassword(t *testing.T) {
	store := testenv.Store(t)
	list := "amqp://guest:first-s3cret@127.0.0.1:1/,amqp://other:second-s3cret@127.0.0.1:2/"
	var out, errOut bytes.Buffer
	code := Main(context.Background(), []string{
		"--database-url", testenv.DatabaseURL(), "--schema", store.Schema(), "--amqp-url", list, "broadcast", "--insecure",
	}, &out, &errOut)
	require.Equal(t, 1, code, errOut.String())
	for _, secret := range []string{"first-s3cret", "second-s3cret"} {
		require.NotContains(t, errOut.String(), secret)
		require.NotContains(t, out.String(), secret)
	}
	require.Contains(t, errOut.String(), "other:xxxxx@127.0.0.1:2", "the error names the second node")
	require.Contains(t, errOut.String(), "connection refused")
}
