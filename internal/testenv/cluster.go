package testenv

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// EnvRabbitMQBin names the directory of the rabbitmq-server and
// rabbitmqctl scripts RabbitCluster runs: they must be the scripts
// themselves, not Debian's /usr/sbin wrappers, which switch to the
// rabbitmq user and lose the cluster's environment.
const EnvRabbitMQBin = "PHASECAST_RABBITMQ_BIN"

// defaultRabbitMQBin is where Debian's rabbitmq-server package puts them.
const defaultRabbitMQBin = "/usr/lib/rabbitmq/bin"

// clusterBasePort is the AMQP port of the first node a RabbitCluster
// starts (5681, 5682, ...); a node's distribution port is its AMQP port
// plus 20000. Neither touches the default node's 5672 and 25672.
const clusterBasePort = 5681

// clusterStateDir keeps the PID of every node a RabbitCluster started, so
// that a run killed before its clean-up (a test binary's timeout) has its
// own leftover nodes stopped by the next run, by PID, and nothing else.
const clusterStateDir = "/tmp/phasecast-rabbit-cluster"

// RabbitNode is one node of a RabbitCluster.
type RabbitNode struct {
	Name string // "rabbit-pc1@localhost"
	Port int    // its AMQP port on 127.0.0.1
	dir  string
	env  []string
	c    *Cluster

	mu     sync.Mutex
	pid    int           // the node's beam.smp, 0 while down
	exited chan struct{} // closed when the rabbitmq-server script ended
}

// URL is the node's AMQP URL for guest, which a node only accepts from
// 127.0.0.1, as here.
func (n *RabbitNode) URL() string { return fmt.Sprintf("amqp://guest:guest@127.0.0.1:%d/", n.Port) }

// Cluster is a RabbitMQ cluster of the test's own: nodes started
// from the installed RabbitMQ with their own node names, ports, data,
// logs, configuration and Erlang cookie (HOME is a temporary directory),
// joined with stop_app, join_cluster and start_app. The default node and
// its configuration are never touched. Only the processes it started are
// stopped, by PID.
type Cluster struct {
	Nodes []*RabbitNode
	bin   string
	home  string
	// Started is how long starting and joining the nodes took.
	Started time.Duration
}

// RabbitCluster starts n nodes, joins them into one cluster and returns
// once every node runs the broker; the nodes are killed when the test
// ends. It fails the test, with what to do, when RabbitMQ is not
// installed or a port is taken.
func RabbitCluster(t testing.TB, n int) *Cluster {
	t.Helper()
	begin := time.Now()
	bin := os.Getenv(EnvRabbitMQBin)
	if bin == "" {
		bin = defaultRabbitMQBin
	}
	for _, script := range []string{"rabbitmq-server", "rabbitmqctl"} {
		_, err := os.Stat(filepath.Join(bin, script))
		require.NoError(t, err, "a test cluster needs RabbitMQ's own scripts: install rabbitmq-server, or set %s to the directory of rabbitmq-server and rabbitmqctl", EnvRabbitMQBin)
	}
	home := t.TempDir()
	cookie := make([]byte, 16)
	_, err := rand.Read(cookie)
	require.NoError(t, err)
	// One cookie for every node and for rabbitmqctl: they find it in HOME.
	require.NoError(t, os.WriteFile(filepath.Join(home, ".erlang.cookie"), []byte(hex.EncodeToString(cookie)), 0o400))
	// No rabbitmq-env.conf and no plugins (the management plugin would
	// want the default node's port 15672).
	require.NoError(t, os.WriteFile(filepath.Join(home, "rabbitmq-env.conf"), nil, 0o600))
	require.NoError(t, os.WriteFile(filepath.Join(home, "enabled_plugins"), []byte("[].\n"), 0o600))
	require.NoError(t, os.MkdirAll(clusterStateDir, 0o700))

	c := &Cluster{bin: bin, home: home}
	for i := range n {
		node := &RabbitNode{Name: fmt.Sprintf("rabbit-pc%d@localhost", i+1), Port: clusterBasePort + i, dir: filepath.Join(home, fmt.Sprintf("node%d", i+1)), c: c}
		stopLeftover(t, node.Name)
		for _, port := range []int{node.Port, node.Port + 20000} {
			if l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port)); err != nil {
				t.Fatalf("port %d for test node %s is taken (%v): free it, or stop what listens there", port, node.Name, err)
			} else {
				_ = l.Close()
			}
		}
		require.NoError(t, os.MkdirAll(node.dir, 0o700))
		conf := fmt.Sprintf("listeners.tcp.default = 127.0.0.1:%d\n", node.Port)
		require.NoError(t, os.WriteFile(filepath.Join(node.dir, "rabbitmq.conf"), []byte(conf), 0o600))
		node.env = append(c.ctlEnv(),
			"RABBITMQ_NODENAME="+node.Name,
			"RABBITMQ_NODE_PORT="+strconv.Itoa(node.Port),
			"RABBITMQ_DIST_PORT="+strconv.Itoa(node.Port+20000),
			"RABBITMQ_MNESIA_BASE="+filepath.Join(node.dir, "mnesia"),
			"RABBITMQ_LOG_BASE="+filepath.Join(node.dir, "log"),
			"RABBITMQ_CONFIG_FILE="+filepath.Join(node.dir, "rabbitmq.conf"),
			"RABBITMQ_ADVANCED_CONFIG_FILE="+filepath.Join(node.dir, "advanced.config"),
			"RABBITMQ_ENABLED_PLUGINS_FILE="+filepath.Join(home, "enabled_plugins"),
			"RABBITMQ_PID_FILE="+filepath.Join(node.dir, "beam.pid"),
			"RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=-kernel inet_dist_use_interface {127,0,0,1}",
		)
		c.Nodes = append(c.Nodes, node)
	}
	t.Cleanup(func() {
		for _, node := range c.Nodes {
			node.kill()
		}
	})
	// Started at once: each boot takes seconds, most of it waiting.
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i, node := range c.Nodes {
		wg.Go(func() { errs[i] = node.start() })
	}
	wg.Wait()
	require.NoError(t, errors.Join(errs...))
	booted := time.Since(begin)
	// The joins run one after another: two nodes joining at once race on
	// the first node's schema transaction, and one of them fails with
	// mnesia's "aborted ... schema_prepare". A join that fails anyway is
	// retried from a reset node, which is what an operator would do.
	for _, node := range c.Nodes[1:] {
		require.NoError(t, c.join(node, c.Nodes[0]))
	}
	t.Logf("test cluster: %d nodes booted in %s, joined in %s", n, booted.Round(time.Millisecond), (time.Since(begin) - booted).Round(time.Millisecond))
	running := c.RunningNodes(t)
	require.Len(t, running, n, "nodes running in the cluster: %v", running)
	c.Started = time.Since(begin)
	return c
}

// joinAttempts bounds how often join retries one node's join.
const joinAttempts = 3

// join makes node a member of first's cluster; a failed attempt is
// retried after rabbitmqctl reset, which leaves the node's data empty.
func (c *Cluster) join(node, first *RabbitNode) error {
	var errs []error
	for attempt := range joinAttempts {
		steps := [][]string{{"stop_app"}, {"join_cluster", first.Name}, {"start_app"}}
		if attempt > 0 {
			steps = [][]string{{"stop_app"}, {"reset"}, {"join_cluster", first.Name}, {"start_app"}}
		}
		err := func() error {
			for _, args := range steps {
				if out, err := c.ctl(node, 60*time.Second, args...); err != nil {
					return fmt.Errorf("rabbitmqctl -n %s %s: %w: %s", node.Name, strings.Join(args, " "), err, out)
				}
			}
			return nil
		}()
		if err == nil {
			return nil
		}
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// ctlEnv is the environment every command of the cluster runs with.
func (c *Cluster) ctlEnv() []string {
	return append(os.Environ(), "HOME="+c.home, "RABBITMQ_CONF_ENV_FILE="+filepath.Join(c.home, "rabbitmq-env.conf"))
}

// URLs returns the AMQP URLs of the nodes with the given indexes (every
// node without any) as a comma-separated list, as --amqp-url takes it.
func (c *Cluster) URLs(nodes ...int) string {
	if len(nodes) == 0 {
		for i := range c.Nodes {
			nodes = append(nodes, i)
		}
	}
	urls := make([]string, len(nodes))
	for i, n := range nodes {
		urls[i] = c.Nodes[n].URL()
	}
	return strings.Join(urls, ",")
}

// Ctl runs rabbitmqctl against node and returns its output.
func (c *Cluster) Ctl(t testing.TB, node *RabbitNode, args ...string) string {
	t.Helper()
	out, err := c.ctl(node, 60*time.Second, args...)
	require.NoError(t, err, "rabbitmqctl -n %s %s:\n%s", node.Name, strings.Join(args, " "), out)
	return out
}

func (c *Cluster) ctl(node *RabbitNode, timeout time.Duration, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(c.bin, "rabbitmqctl"), append([]string{"-n", node.Name}, args...)...)
	cmd.Env = c.ctlEnv()
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// RunningNodes asks the first node that answers which nodes of the
// cluster run.
func (c *Cluster) RunningNodes(t testing.TB) []string {
	t.Helper()
	var errs []error
	for _, node := range c.Nodes {
		if !node.Up() {
			continue
		}
		out, err := c.ctl(node, 30*time.Second, "cluster_status", "--formatter", "json")
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w: %s", node.Name, err, out))
			continue
		}
		var status struct {
			Running []string `json:"running_nodes"`
		}
		require.NoError(t, json.Unmarshal([]byte(out), &status), out)
		return status.Running
	}
	t.Fatalf("no node of the cluster answers: %v", errors.Join(errs...))
	return nil
}

// Up reports whether the node's process runs.
func (n *RabbitNode) Up() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.pid != 0
}

// PID is the node's beam.smp process, 0 while it is down.
func (n *RabbitNode) PID() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.pid
}

// Kill kills the node's Erlang VM with SIGKILL, as a crash would, and
// waits until its rabbitmq-server script has ended.
func (n *RabbitNode) Kill(t testing.TB) {
	t.Helper()
	require.True(t, n.Up(), "node %s is not running", n.Name)
	n.kill()
}

func (n *RabbitNode) kill() {
	n.mu.Lock()
	pid, exited := n.pid, n.exited
	n.pid = 0
	n.mu.Unlock()
	if pid == 0 {
		return
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
	select {
	case <-exited:
	case <-time.After(10 * time.Second):
	}
	_ = os.Remove(leftoverFile(n.Name))
}

// Start starts a node that was killed again, on its own data: it rejoins
// the cluster as it boots, and Start returns once its broker runs. It may
// run on any goroutine.
func (n *RabbitNode) Start() error {
	if n.Up() {
		return fmt.Errorf("node %s is already running", n.Name)
	}
	return n.start()
}

// start runs rabbitmq-server for the node and waits until the broker
// runs (rabbitmqctl await_startup).
func (n *RabbitNode) start() error {
	pidFile := filepath.Join(n.dir, "beam.pid")
	_ = os.Remove(pidFile)
	out, err := os.OpenFile(filepath.Join(n.dir, "server.out"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	cmd := exec.Command(filepath.Join(n.c.bin, "rabbitmq-server"))
	cmd.Env, cmd.Stdout, cmd.Stderr, cmd.Dir = n.env, out, out, n.dir
	if err := cmd.Start(); err != nil {
		_ = out.Close()
		return fmt.Errorf("start %s: %w", n.Name, err)
	}
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		_ = out.Close()
		close(exited)
	}()
	// The script writes the Erlang VM's PID once it runs: that process,
	// not the script, is the node.
	deadline := time.Now().Add(90 * time.Second)
	pid := 0
	for pid == 0 {
		if b, err := os.ReadFile(pidFile); err == nil {
			pid, _ = strconv.Atoi(strings.TrimSpace(string(b)))
		}
		select {
		case <-exited:
			return fmt.Errorf("%s: rabbitmq-server exited at start; see %s", n.Name, filepath.Join(n.dir, "server.out"))
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill()
			return fmt.Errorf("%s: no PID file within 90s", n.Name)
		}
	}
	n.mu.Lock()
	n.pid, n.exited = pid, exited
	n.mu.Unlock()
	_ = os.WriteFile(leftoverFile(n.Name), []byte(strconv.Itoa(pid)), 0o600)
	// await_startup fails at once while the node has not registered with
	// epmd yet: ask again until it waits for real.
	var last string
	for time.Now().Before(deadline) {
		out, err := n.c.ctl(n, time.Until(deadline), "await_startup")
		if err == nil {
			return nil
		}
		last = out
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Errorf("%s did not start within 90s: %s", n.Name, last)
}

func leftoverFile(node string) string { return filepath.Join(clusterStateDir, node+".pid") }

// stopLeftover kills a node of this name that an earlier run started and
// could not stop: only the PID it recorded, and only if that process is
// still an Erlang VM running that very node.
func stopLeftover(t testing.TB, node string) {
	b, err := os.ReadFile(leftoverFile(node))
	if err != nil {
		return
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err == nil && pid > 0 {
		// The node's name is in the VM's environment, not its arguments.
		cmdline, err1 := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		environ, err2 := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
		if err1 == nil && err2 == nil && strings.Contains(string(cmdline), "beam") && strings.Contains(string(environ), "\x00RABBITMQ_NODENAME="+node+"\x00") {
			t.Logf("killing node %s (pid %d) left over from an earlier run", node, pid)
			_ = syscall.Kill(pid, syscall.SIGKILL)
			time.Sleep(time.Second)
		}
	}
	_ = os.Remove(leftoverFile(node))
}

// DocPolicies reads the rabbitmqctl set_policy lines of the document at
// path (docs/rabbitmq-cluster.md) and returns each line's arguments after
// "rabbitmqctl", requiring at least one, each for DocVhost: what the
// document tells operators is then what tests apply.
func DocPolicies(t testing.TB, path string) [][]string {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	var out [][]string
	for line := range strings.Lines(string(b)) {
		line = strings.TrimSpace(line)
		if !strings.HasPrefix(line, "rabbitmqctl set_policy ") {
			continue
		}
		args := shellWords(t, line)[1:]
		require.Equal(t, []string{"set_policy", "-p", DocVhost}, args[:3], "want: rabbitmqctl set_policy -p %s ..., got: %s", DocVhost, line)
		out = append(out, args)
	}
	require.NotEmpty(t, out, "no set_policy line in %s", path)
	return out
}

// ApplyDocPolicies applies the document's policies to the cluster, in
// vhost "/" and for prefix instead of the document's "phasecast".
func (c *Cluster) ApplyDocPolicies(t testing.TB, path, prefix string) {
	t.Helper()
	for _, args := range DocPolicies(t, path) {
		args = append([]string{"set_policy", "-p", "/"}, args[3:]...)
		for i, a := range args {
			args[i] = strings.ReplaceAll(a, docPrefixRegex, regexp.QuoteMeta(prefix)+`\.`)
		}
		c.Ctl(t, c.Nodes[0], args...)
	}
}

// ConnectionNames returns, by node index, the names clients gave their
// connections to that node (the connection_name property), as the first
// node that answers lists them.
func (c *Cluster) ConnectionNames(t testing.TB) map[int][]string {
	t.Helper()
	for _, node := range c.Nodes {
		if !node.Up() {
			continue
		}
		out, err := c.ctl(node, 30*time.Second, "list_connections", "port", "client_properties", "--formatter", "json")
		if err != nil {
			continue
		}
		var conns []struct {
			Port  int               `json:"port"`
			Props []json.RawMessage `json:"client_properties"`
		}
		require.NoError(t, json.Unmarshal([]byte(out), &conns), out)
		byNode := map[int][]string{}
		for _, conn := range conns {
			for _, raw := range conn.Props {
				var prop []any // [key, type, value]
				if json.Unmarshal(raw, &prop) == nil && len(prop) == 3 && prop[0] == "connection_name" {
					name, _ := prop[2].(string)
					byNode[conn.Port-clusterBasePort] = append(byNode[conn.Port-clusterBasePort], name)
				}
			}
		}
		return byNode
	}
	t.Fatal("no node of the cluster answers")
	return nil
}
