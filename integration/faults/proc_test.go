package faults

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// binDir holds the binaries the tests build once per run.
var binDir string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "phasecast-faults-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "faults:", err)
		os.Exit(1)
	}
	binDir = dir
	code := m.Run()
	_ = os.RemoveAll(dir)
	os.Exit(code)
}

// The commands the tests run as processes of their own, by binary name.
var packages = map[string]string{
	"phasecast": "github.com/phasecast/phasecast/cmd/phasecast",
	"novalike":  "github.com/phasecast/phasecast/examples/novalike/cmd/novalike",
}

var (
	buildMu sync.Mutex
	built   = map[string]string{}
)

// binary builds a command once per test run and returns its path.
func binary(t *testing.T, name string) string {
	t.Helper()
	buildMu.Lock()
	defer buildMu.Unlock()
	if path, ok := built[name]; ok {
		return path
	}
	goTool, err := exec.LookPath("go")
	if err != nil {
		goTool = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	path := filepath.Join(binDir, name)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, goTool, "build", "-o", path, packages[name]).CombinedOutput()
	require.NoError(t, err, "go build %s:\n%s", packages[name], out)
	built[name] = path
	return path
}

// proc is a command run as a process of its own, its output in a file.
type proc struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	done    chan struct{}
	err     error // set before done is closed
}

// startProc starts a process that is killed, if still running, when the
// test ends; its output is shown if the test failed.
func startProc(t *testing.T, name, path string, args ...string) *proc {
	t.Helper()
	logPath := filepath.Join(t.TempDir(), name+".log")
	f, err := os.Create(logPath)
	require.NoError(t, err)
	cmd := exec.Command(path, args...)
	cmd.Stdout, cmd.Stderr = f, f
	require.NoError(t, cmd.Start(), "start %s", name)
	p := &proc{name: name, cmd: cmd, logPath: logPath, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		f.Close()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.signal(syscall.SIGKILL)
		<-p.done
		if t.Failed() {
			out, _ := os.ReadFile(logPath)
			if len(out) > 8000 {
				out = out[len(out)-8000:]
			}
			t.Logf("%s's output (last 8000 bytes):\n%s", name, out)
		}
	})
	return p
}

func (p *proc) signal(sig syscall.Signal) {
	select {
	case <-p.done:
	default:
		_ = p.cmd.Process.Signal(sig)
	}
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

// wait waits for the process to exit.
func (p *proc) wait(t *testing.T, limit time.Duration) {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(limit):
		t.Fatalf("%s did not exit within %s", p.name, limit)
	}
}

// output returns what the process wrote so far.
func (p *proc) output() string {
	out, _ := os.ReadFile(p.logPath)
	return string(out)
}

// run runs a command to completion and returns its output.
func run(t *testing.T, path string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, path, args...).CombinedOutput()
	require.NoError(t, err, "%s %s:\n%s", filepath.Base(path), strings.Join(args, " "), out)
	return string(out)
}
