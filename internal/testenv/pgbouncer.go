package testenv

import (
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// PgBouncer pool modes.
const (
	PoolSession     = "session"
	PoolTransaction = "transaction"
)

// PgBouncer starts a PgBouncer of the test's own in front of the test
// database, in pool mode mode (PoolSession or PoolTransaction), and returns
// DatabaseURL with its host and port in place of the server's. It runs
// from a temporary directory holding its ini, auth file, pid file and log;
// as root it runs as user postgres, since PgBouncer refuses to run as root.
// It is stopped by its pid when the test ends. A missing pgbouncer binary
// fails the test: CI installs it (.ci/run).
func PgBouncer(t testing.TB, mode string) string {
	t.Helper()
	require.Contains(t, []string{PoolSession, PoolTransaction}, mode, "pool mode")
	bin, err := exec.LookPath("pgbouncer")
	if err != nil {
		for _, p := range []string{"/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"} {
			if _, serr := os.Stat(p); serr == nil {
				bin, err = p, nil
				break
			}
		}
	}
	require.NoError(t, err, "pgbouncer must be installed (apt-get install pgbouncer; .ci/run installs it)")

	server, err := url.Parse(DatabaseURL())
	require.NoError(t, err)
	serverHost, serverPort := server.Hostname(), server.Port()
	if serverPort == "" {
		serverPort = "5432"
	}
	dbUser := server.User.Username()
	if dbUser == "" {
		dbUser = "postgres"
	}
	dbName := strings.TrimPrefix(server.Path, "/")
	if dbName == "" {
		dbName = dbUser
	}
	password, _ := server.User.Password()

	// As root, under /tmp, which user postgres can reach whatever TMPDIR says.
	base := ""
	if os.Geteuid() == 0 {
		base = "/tmp"
	}
	dir, err := os.MkdirTemp(base, "pgbouncer-")
	require.NoError(t, err)
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	port := freePort(t)
	// The server's own user logs in on trust, as on the server, or with
	// the URL's password passed on to the server.
	ini := fmt.Sprintf(`[databases]
* = host=%s port=%s

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = %d
unix_socket_dir =
auth_type = trust
auth_file = %s
pidfile = %s
logfile = %s
pool_mode = %s
max_client_conn = 200
default_pool_size = 6
server_lifetime = 60
ignore_startup_parameters = extra_float_digits
`, serverHost, serverPort, port, filepath.Join(dir, "users.txt"), filepath.Join(dir, "pgbouncer.pid"),
		filepath.Join(dir, "pgbouncer.log"), mode)
	if password != "" {
		ini = strings.Replace(ini, "* = host=", "* = password="+password+" host=", 1)
	}
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pgbouncer.ini"), []byte(ini), 0o600))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "users.txt"), []byte(fmt.Sprintf("%q \"\"\n", dbUser)), 0o600))

	cmd := exec.Command(bin, filepath.Join(dir, "pgbouncer.ini"))
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		require.NoError(t, err, "running as root, PgBouncer needs the user postgres to run as")
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		require.NoError(t, filepath.Walk(dir, func(p string, _ os.FileInfo, err error) error {
			if err != nil {
				return err
			}
			return os.Chown(p, uid, gid)
		}))
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}}
	}
	require.NoError(t, cmd.Start())
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = syscall.Kill(cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
			_ = syscall.Kill(cmd.Process.Pid, syscall.SIGKILL)
			<-exited
		}
	})

	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	deadline := time.Now().Add(10 * time.Second)
	for {
		select {
		case err := <-exited:
			exited <- err
			log, _ := os.ReadFile(filepath.Join(dir, "pgbouncer.log"))
			t.Fatalf("pgbouncer exited at start (%v): %s", err, log)
		default:
		}
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			_ = c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("pgbouncer did not listen on %s within 10 s", addr)
		}
		time.Sleep(50 * time.Millisecond)
	}
	pooled := *server
	pooled.Host = addr
	return pooled.String()
}

// freePort asks the kernel for a port free on the loopback interface.
func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// WithParam returns databaseURL with the query parameter key set to value.
func WithParam(databaseURL, key, value string) string {
	u, err := url.Parse(databaseURL)
	if err != nil {
		panic(fmt.Sprintf("testenv.WithParam: %v", err)) // test URLs are ours
	}
	q := u.Query()
	q.Set(key, value)
	u.RawQuery = q.Encode()
	return u.String()
}
