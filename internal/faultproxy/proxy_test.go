package faultproxy_test

import (
	"context"
	"database/sql"
	"errors"
	"io"
	"net"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	_ "github.com/lib/pq" // the postgres driver
	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/faultproxy"
	"github.com/phasecast/phasecast/internal/testenv"
)

// echoServer is an upstream that echoes every byte back and counts the
// connections it has accepted. Its goroutines are joined when the test ends.
type echoServer struct {
	ln       net.Listener
	accepted atomic.Int64
	wg       sync.WaitGroup
	mu       sync.Mutex
	conns    []net.Conn
}

func startEcho(t *testing.T) *echoServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	s := &echoServer{ln: ln}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.accepted.Add(1)
			s.mu.Lock()
			s.conns = append(s.conns, c)
			s.mu.Unlock()
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				defer c.Close()
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	t.Cleanup(func() {
		_ = ln.Close()
		s.mu.Lock()
		for _, c := range s.conns {
			_ = c.Close()
		}
		s.mu.Unlock()
		s.wg.Wait()
	})
	return s
}

func (s *echoServer) addr() string { return s.ln.Addr().String() }

func dial(t *testing.T, p *faultproxy.Proxy) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", p.Addr(), 2*time.Second)
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// requireEcho writes msg and requires it back within a second.
func requireEcho(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	_, err := c.Write([]byte(msg))
	require.NoError(t, err)
	requireRead(t, c, msg, time.Second)
}

func requireRead(t *testing.T, c net.Conn, want string, within time.Duration) {
	t.Helper()
	require.NoError(t, c.SetReadDeadline(time.Now().Add(within)))
	got := make([]byte, len(want))
	_, err := io.ReadFull(c, got)
	require.NoError(t, err)
	require.Equal(t, want, string(got))
}

// requireSilent requires that nothing arrives on c for d, and that c is not
// closed meanwhile.
func requireSilent(t *testing.T, c net.Conn, d time.Duration) {
	t.Helper()
	require.NoError(t, c.SetReadDeadline(time.Now().Add(d)))
	n, err := c.Read(make([]byte, 1))
	require.Zero(t, n, "bytes arrived through a blackhole")
	var ne net.Error
	require.True(t, errors.As(err, &ne) && ne.Timeout(), "want a read timeout, got %v", err)
}

// requireClosed requires that c is closed by its peer within d.
func requireClosed(t *testing.T, c net.Conn, d time.Duration) {
	t.Helper()
	require.NoError(t, c.SetReadDeadline(time.Now().Add(d)))
	_, err := c.Read(make([]byte, 1))
	require.Error(t, err)
	var ne net.Error
	require.False(t, errors.As(err, &ne) && ne.Timeout(), "connection still open after %s", d)
}

// proxyGoroutines returns the stacks of goroutines running proxy code.
func proxyGoroutines() []string {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var found []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "faultproxy.(*Proxy)") || strings.Contains(g, "faultproxy.(*link)") {
			found = append(found, g)
		}
	}
	return found
}

// requireNoProxyGoroutines requires every proxy goroutine to be gone. A
// goroutine whose deferred wg.Done has run may still be on its way out when
// Close returns, so allow it a moment; one still working never leaves.
func requireNoProxyGoroutines(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(time.Second)
	for len(proxyGoroutines()) > 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	require.Empty(t, proxyGoroutines(), "goroutines outlived Close")
}

func TestForward(t *testing.T) {
	echo := startEcho(t)
	p := faultproxy.Start(t, echo.addr())

	c := dial(t, p)
	requireEcho(t, c, "hello")
	requireEcho(t, c, strings.Repeat("x", 100<<10))
	require.Equal(t, 1, p.Conns())

	require.NoError(t, c.Close())
	require.Eventually(t, func() bool { return p.Conns() == 0 }, 2*time.Second, 10*time.Millisecond)
}

func TestCut(t *testing.T) {
	echo := startEcho(t)
	p := faultproxy.Start(t, echo.addr())

	a, b := dial(t, p), dial(t, p)
	requireEcho(t, a, "a")
	requireEcho(t, b, "b")
	require.Equal(t, 2, p.Conns())

	p.Cut()
	requireClosed(t, a, time.Second)
	requireClosed(t, b, time.Second)
	require.Equal(t, 0, p.Conns())

	// Still accepting: a client's reconnect succeeds.
	requireEcho(t, dial(t, p), "again")
}

func TestBlackhole(t *testing.T) {
	echo := startEcho(t)
	p := faultproxy.Start(t, echo.addr())

	old := dial(t, p)
	requireEcho(t, old, "before")

	p.Blackhole(true)
	p.Blackhole(true) // idempotent
	_, err := old.Write([]byte("during"))
	require.NoError(t, err)
	fresh := dial(t, p)
	_, err = fresh.Write([]byte("fresh"))
	require.NoError(t, err)
	requireSilent(t, old, 300*time.Millisecond)
	requireSilent(t, fresh, 10*time.Millisecond)
	require.Equal(t, int64(1), echo.accepted.Load(), "upstream dialled through a blackhole")
	require.Equal(t, 2, p.Conns())

	p.Blackhole(false)
	p.Blackhole(false) // idempotent
	requireRead(t, old, "during", time.Second)
	requireRead(t, fresh, "fresh", time.Second)
	requireEcho(t, old, "after")
	requireEcho(t, fresh, "after")
	require.Equal(t, int64(2), echo.accepted.Load())
}

func TestBlackholeThenCut(t *testing.T) {
	echo := startEcho(t)
	p := faultproxy.Start(t, echo.addr())

	c := dial(t, p)
	requireEcho(t, c, "x")
	p.Blackhole(true)
	pending := dial(t, p)
	require.Eventually(t, func() bool { return p.Conns() == 2 }, time.Second, 5*time.Millisecond)

	p.Cut()
	requireClosed(t, c, time.Second)
	requireClosed(t, pending, time.Second)
	require.Equal(t, 0, p.Conns())
	p.Blackhole(false)
	requireEcho(t, dial(t, p), "y")
}

func TestRefuse(t *testing.T) {
	echo := startEcho(t)
	p := faultproxy.Start(t, echo.addr())

	old := dial(t, p)
	requireEcho(t, old, "x")

	p.Refuse(true)
	requireClosed(t, dial(t, p), time.Second)
	requireEcho(t, old, "existing connections are not touched")
	require.Equal(t, 1, p.Conns())

	p.Refuse(false)
	requireEcho(t, dial(t, p), "y")
}

func TestUpstreamDown(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := ln.Addr().String()
	require.NoError(t, ln.Close())

	p := faultproxy.Start(t, addr)
	requireClosed(t, dial(t, p), 2*time.Second)
	require.Eventually(t, func() bool { return p.Conns() == 0 }, time.Second, 5*time.Millisecond)
}

func TestCloseJoinsEverything(t *testing.T) {
	echo := startEcho(t)
	p, err := faultproxy.New(echo.addr())
	require.NoError(t, err)

	live := dial(t, p)
	requireEcho(t, live, "x")
	held := dial(t, p)
	requireEcho(t, held, "y")
	p.Blackhole(true)
	_, err = held.Write([]byte("held in the proxy"))
	require.NoError(t, err)
	pending := dial(t, p) // waits for the blackhole to lift before dialling
	require.Eventually(t, func() bool { return p.Conns() == 3 }, time.Second, 5*time.Millisecond)
	require.NotEmpty(t, proxyGoroutines())

	require.NoError(t, p.Close())
	requireNoProxyGoroutines(t)
	for _, c := range []net.Conn{live, held, pending} {
		requireClosed(t, c, time.Second)
	}
	require.Equal(t, 0, p.Conns())
	require.NoError(t, p.Close(), "second Close")

	_, err = net.DialTimeout("tcp", p.Addr(), time.Second)
	require.Error(t, err, "still listening after Close")
}

func TestURL(t *testing.T) {
	p := faultproxy.Start(t, "127.0.0.1:1")
	for _, tc := range []struct{ in, want string }{
		{"amqp://guest:guest@localhost:5672/", "amqp://guest:guest@" + p.Addr() + "/"},
		{"amqp://guest:guest@localhost/vhost%2Fx?heartbeat=1", "amqp://guest:guest@" + p.Addr() + "/vhost%2Fx?heartbeat=1"},
		{"postgres://postgres@localhost:5432/postgres?sslmode=disable", "postgres://postgres@" + p.Addr() + "/postgres?sslmode=disable"},
		{"postgresql://u:p%40ss@[::1]:6543/db", "postgresql://u:p%40ss@" + p.Addr() + "/db"},
	} {
		require.Equal(t, tc.want, p.URL(tc.in), tc.in)
	}
	require.PanicsWithValue(t, "faultproxy: URL: not a URL with a host", func() {
		p.URL("host=localhost password=secret")
	})
}

func TestHostPort(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"amqp://guest:guest@localhost:5672/", "localhost:5672"},
		{"amqp://localhost/", "localhost:5672"},
		{"amqps://broker.example/", "broker.example:5671"},
		{"postgres://postgres@127.0.0.1/postgres", "127.0.0.1:5432"},
		{"postgresql://[::1]:6543/db", "[::1]:6543"},
	} {
		got, err := faultproxy.HostPort(tc.in)
		require.NoError(t, err, tc.in)
		require.Equal(t, tc.want, got, tc.in)
	}
	for _, in := range []string{"http://example/", "amqp:///vhost", "postgres://user:s3cret@host:port:x/"} {
		_, err := faultproxy.HostPort(in)
		require.Error(t, err, in)
		require.NotContains(t, err.Error(), "s3cret")
	}
}

// amqpProxy starts a proxy in front of the test broker.
func amqpProxy(t *testing.T) *faultproxy.Proxy {
	t.Helper()
	testenv.AMQP(t) // fails with a helpful message if the broker is down
	upstream, err := faultproxy.HostPort(testenv.AMQPURL())
	require.NoError(t, err)
	return faultproxy.Start(t, upstream)
}

func dialAMQP(t *testing.T, p *faultproxy.Proxy, heartbeat time.Duration) (*amqp.Connection, <-chan *amqp.Error) {
	t.Helper()
	conn, err := amqp.DialConfig(p.URL(testenv.AMQPURL()), amqp.Config{Heartbeat: heartbeat, Locale: "en_US"})
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close() })
	return conn, conn.NotifyClose(make(chan *amqp.Error, 1))
}

// requireRoundTrip publishes to a server-named queue and consumes it back.
func requireRoundTrip(t *testing.T, conn *amqp.Connection) {
	t.Helper()
	ch, err := conn.Channel()
	require.NoError(t, err)
	defer ch.Close()
	q, err := ch.QueueDeclare("", false, true, true, false, nil)
	require.NoError(t, err)
	deliveries, err := ch.Consume(q.Name, "", true, true, false, false, nil)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	require.NoError(t, ch.PublishWithContext(ctx, "", q.Name, false, false, amqp.Publishing{Body: []byte("through the proxy")}))
	select {
	case d, ok := <-deliveries:
		require.True(t, ok, "consumer closed")
		require.Equal(t, "through the proxy", string(d.Body))
	case <-ctx.Done():
		t.Fatal("no delivery through the proxy")
	}
}

func requireClosedWithin(t *testing.T, closed <-chan *amqp.Error, d time.Duration) {
	t.Helper()
	select {
	case err := <-closed:
		t.Logf("connection closed: %v", err)
	case <-time.After(d):
		t.Fatalf("NotifyClose did not fire within %s", d)
	}
}

func TestAMQPCut(t *testing.T) {
	p := amqpProxy(t)
	conn, closed := dialAMQP(t, p, 10*time.Second)
	requireRoundTrip(t, conn)
	require.Equal(t, 1, p.Conns())

	p.Cut()
	requireClosedWithin(t, closed, 5*time.Second)
	require.True(t, conn.IsClosed())

	// The reconnect a client would make goes through.
	again, _ := dialAMQP(t, p, 10*time.Second)
	requireRoundTrip(t, again)
}

func TestAMQPBlackholeHeartbeatTimeout(t *testing.T) {
	p := amqpProxy(t)
	conn, closed := dialAMQP(t, p, time.Second)
	requireRoundTrip(t, conn)

	p.Blackhole(true)
	start := time.Now()
	// amqp091-go heartbeats every interval/2 and gives up after three of
	// those pass in silence: 1.5s here.
	requireClosedWithin(t, closed, 8*time.Second)
	t.Logf("heartbeat timeout after %s of blackhole", time.Since(start).Round(100*time.Millisecond))
	require.Greater(t, time.Since(start), time.Second, "closed too soon to be a heartbeat timeout")

	// The proxy closed nothing: the client gave up on its own.
	require.Equal(t, 1, p.Conns())
	p.Blackhole(false)
	again, _ := dialAMQP(t, p, time.Second)
	requireRoundTrip(t, again)

	require.NoError(t, p.Close())
	requireNoProxyGoroutines(t)
}

func TestAMQPRefuse(t *testing.T) {
	p := amqpProxy(t)
	p.Refuse(true)
	_, err := amqp.DialConfig(p.URL(testenv.AMQPURL()), amqp.Config{Dial: amqp.DefaultDial(2 * time.Second)})
	require.Error(t, err)
	p.Refuse(false)
	conn, _ := dialAMQP(t, p, 10*time.Second)
	requireRoundTrip(t, conn)
}

func TestPostgresCut(t *testing.T) {
	testenv.DB(t) // fails with a helpful message if the server is down
	upstream, err := faultproxy.HostPort(testenv.DatabaseURL())
	require.NoError(t, err)
	p := faultproxy.Start(t, upstream)

	db, err := sql.Open("postgres", p.URL(testenv.DatabaseURL()))
	require.NoError(t, err)
	t.Cleanup(func() { _ = db.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	pinned, err := db.Conn(ctx)
	require.NoError(t, err)
	defer pinned.Close()
	var one int
	require.NoError(t, pinned.QueryRowContext(ctx, `SELECT 1`).Scan(&one))
	require.Equal(t, 1, p.Conns())

	p.Cut()
	require.Error(t, pinned.QueryRowContext(ctx, `SELECT 1`).Scan(&one), "query on a cut connection")
	// The pool dials again through the proxy.
	require.NoError(t, db.QueryRowContext(ctx, `SELECT 1`).Scan(&one))
}
