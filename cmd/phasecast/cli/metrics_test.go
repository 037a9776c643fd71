package cli

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/testenv"
)

// TestBroadcastServesMetrics: 'phasecast broadcast --metrics-addr' serves
// the broadcaster's families with the Go and process ones beside them,
// stops serving when the daemon stops, and a taken address fails the
// start with exit 1.
func TestBroadcastServesMetrics(t *testing.T) {
	t.Parallel()
	b, _ := setupCLI(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := ln.Addr().String()
	require.NoError(t, ln.Close())

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	prefix := testenv.Prefix(t)
	keyDir := t.TempDir()
	code, _, errOut := b.run(t, "keys", "generate", "--dir", keyDir)
	require.Zero(t, code, errOut)
	args := []string{"--database-url", testenv.DatabaseURL(), "--amqp-url", testenv.AMQPURL(), "--schema", b.store.Schema(),
		"--exchange-prefix", prefix, "--log-level", "warn", "broadcast", "--metrics-addr", addr,
		"--state-key", filepath.Join(keyDir, "state.key")}
	exited := make(chan int, 1)
	var stderr bytes.Buffer
	go func() { exited <- Main(ctx, args, io.Discard, &stderr) }()

	url := "http://" + addr + "/metrics"
	var body string
	deadline := time.Now().Add(15 * time.Second)
	for {
		resp, err := http.Get(url)
		if err == nil {
			raw, _ := io.ReadAll(resp.Body)
			_ = resp.Body.Close()
			if body = string(raw); resp.StatusCode == http.StatusOK && bytes.Contains(raw, []byte("\nphasecast_broadcaster_leader 1\n")) {
				break
			}
		}
		require.True(t, time.Now().Before(deadline), "no leading broadcaster's metrics on %s: %v %s", url, err, body)
		time.Sleep(50 * time.Millisecond)
	}
	for _, family := range []string{"# TYPE go_goroutines gauge", "# TYPE process_cpu_seconds_total counter",
		"# TYPE phasecast_flip_convergence_seconds histogram", "# TYPE phasecast_outbox_lag_epochs gauge"} {
		require.Contains(t, body, family)
	}

	// A second daemon on the same address does not start.
	var out2 bytes.Buffer
	code = Main(context.Background(), args, io.Discard, &out2)
	require.Equal(t, 1, code, out2.String())
	require.Contains(t, out2.String(), "MetricsAddr")

	cancel()
	select {
	case code := <-exited:
		require.Equal(t, 0, code, stderr.String())
	case <-time.After(15 * time.Second):
		t.Fatal("the daemon did not stop")
	}
	_, err = http.Get(url)
	require.Error(t, err, "the metrics server stopped with the daemon")
}
