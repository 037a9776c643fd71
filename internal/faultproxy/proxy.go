package faultproxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"sync"
	"testing"
	"time"
)

// DialTimeout bounds each dial of the upstream server.
const DialTimeout = 5 * time.Second

// Proxy forwards TCP connections from its own address on 127.0.0.1 to an
// upstream address, and breaks them on request. Its methods are safe for
// concurrent use.
type Proxy struct {
	upstream string
	ln       net.Listener
	ctx      context.Context // cancelled by Close: aborts dials in progress
	cancel   context.CancelFunc
	wg       sync.WaitGroup

	mu        sync.Mutex
	links     map[*link]struct{}
	closed    bool
	refuse    bool
	blackhole chan struct{} // non-nil while blackholed; closed when lifted
}

// New starts a proxy that listens on a free port of 127.0.0.1 and forwards
// to upstream ("host:port").
func New(upstream string) (*Proxy, error) {
	if _, _, err := net.SplitHostPort(upstream); err != nil {
		return nil, fmt.Errorf("faultproxy: upstream %q: %w", upstream, err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("faultproxy: listen: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	p := &Proxy{
		upstream: upstream,
		ln:       ln,
		ctx:      ctx,
		cancel:   cancel,
		links:    make(map[*link]struct{}),
	}
	p.wg.Add(1)
	go p.acceptLoop()
	return p, nil
}

// Start is New for tests: it fails t if the proxy cannot start and closes
// the proxy when the test ends.
func Start(t testing.TB, upstream string) *Proxy {
	t.Helper()
	p, err := New(upstream)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Close() })
	return p
}

// Addr returns the proxy's listening address, "127.0.0.1:port".
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// Upstream returns the address the proxy forwards to.
func (p *Proxy) Upstream() string { return p.upstream }

// URL returns rawURL (amqp://, amqps://, postgres://, …) with its host and
// port replaced by the proxy's address; user, path and query are kept. It
// panics if rawURL is not a URL with a host, since silently returning it
// unchanged would let a fault test bypass the proxy.
func (p *Proxy) URL(rawURL string) string {
	u, err := url.Parse(rawURL)
	if err != nil || u.Scheme == "" || u.Host == "" {
		// Not err itself: it quotes the URL, password included.
		panic("faultproxy: URL: not a URL with a host")
	}
	u.Host = p.Addr()
	return u.String()
}

// defaultPorts are the ports URL schemes imply when a URL names none.
var defaultPorts = map[string]string{
	"amqp":       "5672",
	"amqps":      "5671",
	"postgres":   "5432",
	"postgresql": "5432",
}

// HostPort returns the "host:port" a URL points at, for New: the explicit
// port, or the scheme's default for amqp, amqps, postgres and postgresql.
func HostPort(rawURL string) (string, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		// url's errors quote the whole URL, password included.
		return "", errors.New("faultproxy: cannot parse the URL")
	}
	if u.Hostname() == "" {
		return "", fmt.Errorf("faultproxy: %s URL names no host", u.Scheme)
	}
	port := u.Port()
	if port == "" {
		port = defaultPorts[u.Scheme]
	}
	if port == "" {
		return "", fmt.Errorf("faultproxy: %s URL names no port, and the scheme has no default", u.Scheme)
	}
	return net.JoinHostPort(u.Hostname(), port), nil
}

// Conns returns the number of client connections currently open through
// the proxy, including those waiting for a blackhole to lift before their
// upstream is dialled.
func (p *Proxy) Conns() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.links)
}

// Cut closes every current connection, client and upstream side. New
// connections are accepted as before.
func (p *Proxy) Cut() {
	for _, l := range p.snapshot() {
		l.close()
	}
}

// Blackhole starts (on) or ends (off) a partition. While it lasts, new
// connections are accepted but not forwarded, and nothing is forwarded on
// existing ones in either direction; nothing is closed. When it ends,
// forwarding resumes on the connections that survived.
func (p *Proxy) Blackhole(on bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case on && p.blackhole == nil:
		p.blackhole = make(chan struct{})
	case !on && p.blackhole != nil:
		close(p.blackhole)
		p.blackhole = nil
	}
}

// Refuse makes the proxy close new connections as soon as it accepts them
// (on), or accept them again (off). Existing connections are not touched.
func (p *Proxy) Refuse(on bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.refuse = on
}

// Close stops listening, closes every connection, and returns once every
// goroutine of the proxy has ended. It is safe to call more than once.
func (p *Proxy) Close() error {
	p.mu.Lock()
	already := p.closed
	p.closed = true
	p.mu.Unlock()
	var err error
	if !already {
		p.cancel()
		err = p.ln.Close()
		p.Cut()
	}
	p.wg.Wait()
	return err
}

func (p *Proxy) snapshot() []*link {
	p.mu.Lock()
	defer p.mu.Unlock()
	links := make([]*link, 0, len(p.links))
	for l := range p.links {
		links = append(links, l)
	}
	return links
}

func (p *Proxy) acceptLoop() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of file descriptors and the like: wait a little rather
			// than spin, unless the proxy is closing.
			select {
			case <-p.ctx.Done():
				return
			case <-time.After(10 * time.Millisecond):
			}
			continue
		}
		l := p.register(c)
		if l == nil {
			continue
		}
		p.wg.Add(1)
		go p.serve(l)
	}
}

// register tracks a new client connection, or closes it if the proxy is
// refusing or closed.
func (p *Proxy) register(c net.Conn) *link {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed || p.refuse {
		_ = c.Close()
		return nil
	}
	l := &link{p: p, client: c, done: make(chan struct{})}
	p.links[l] = struct{}{}
	return l
}

func (p *Proxy) serve(l *link) {
	defer p.wg.Done()
	// A partitioned client's SYN would not reach the server either: dial
	// upstream only once the blackhole lifts.
	if !p.waitOpen(l) {
		return
	}
	d := net.Dialer{Timeout: DialTimeout}
	server, err := d.DialContext(p.ctx, "tcp", p.upstream)
	if err != nil {
		l.close()
		return
	}
	if !l.setServer(server) {
		return
	}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		p.pump(l, l.client, server)
	}()
	p.pump(l, server, l.client)
}

// pump copies src to dst until either fails or the link closes, holding
// bytes while the proxy is blackholed. It closes the whole link when it
// stops, so the other direction stops too.
func (p *Proxy) pump(l *link, dst, src net.Conn) {
	defer l.close()
	buf := make([]byte, 32<<10)
	for {
		if !p.waitOpen(l) {
			return
		}
		n, err := src.Read(buf)
		if n > 0 {
			// A read already under way when the blackhole began must not
			// deliver its bytes through it.
			if !p.waitOpen(l) {
				return
			}
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// waitOpen returns true once no blackhole is in force, or false if the link
// closes first.
func (p *Proxy) waitOpen(l *link) bool {
	for {
		p.mu.Lock()
		gate := p.blackhole
		p.mu.Unlock()
		if gate == nil {
			select {
			case <-l.done:
				return false
			default:
				return true
			}
		}
		select {
		case <-gate:
			// Lifted, but it may have begun again since: look again.
		case <-l.done:
			return false
		}
	}
}

// link is one proxied connection: the client side, and the upstream side
// once dialled.
type link struct {
	p      *Proxy
	client net.Conn
	done   chan struct{} // closed by close

	mu     sync.Mutex
	server net.Conn
	closed bool
}

// setServer attaches the upstream connection, or closes it and returns
// false if the link was closed while it was being dialled.
func (l *link) setServer(c net.Conn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		_ = c.Close()
		return false
	}
	l.server = c
	return true
}

// close closes both sides and forgets the link. Safe to call repeatedly.
func (l *link) close() {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return
	}
	l.closed = true
	close(l.done)
	_ = l.client.Close()
	if l.server != nil {
		_ = l.server.Close()
	}
	l.mu.Unlock()

	l.p.mu.Lock()
	delete(l.p.links, l)
	l.p.mu.Unlock()
}
