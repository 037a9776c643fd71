package testenv

import (
	"context"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// built holds the commands Build compiled, by import path, in a folder
// of this test binary's own.
var built struct {
	mu    sync.Mutex
	dir   string
	paths map[string]string
}

// Build compiles the main packages pkgs (import paths, e.g.
// github.com/phasecast/phasecast/cmd/phasecast) once per test binary and
// returns the path of each one's binary, in the order given. Those not
// built yet are built in one go build. A test binary that calls it
// removes the binaries with RemoveBuilt once its tests have run.
func Build(t testing.TB, pkgs ...string) []string {
	t.Helper()
	built.mu.Lock()
	defer built.mu.Unlock()
	if built.dir == "" {
		dir, err := os.MkdirTemp("", "phasecast-test-bin-")
		require.NoError(t, err)
		built.dir, built.paths = dir, map[string]string{}
	}
	var missing []string
	for _, pkg := range pkgs {
		if _, ok := built.paths[pkg]; !ok {
			missing = append(missing, pkg)
		}
	}
	if len(missing) > 0 {
		goTool, err := exec.LookPath("go")
		if err != nil {
			goTool = filepath.Join(runtime.GOROOT(), "bin", "go")
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		args := append([]string{"build", "-o", built.dir + string(filepath.Separator)}, missing...)
		out, err := exec.CommandContext(ctx, goTool, args...).CombinedOutput()
		require.NoError(t, err, "go build %v:\n%s", missing, out)
		for _, pkg := range missing {
			built.paths[pkg] = filepath.Join(built.dir, path.Base(pkg))
		}
	}
	paths := make([]string, len(pkgs))
	for i, pkg := range pkgs {
		paths[i] = built.paths[pkg]
	}
	return paths
}

// RemoveBuilt removes what Build compiled: for TestMain, after m.Run.
func RemoveBuilt() {
	built.mu.Lock()
	defer built.mu.Unlock()
	if built.dir != "" {
		_ = os.RemoveAll(built.dir)
		built.dir, built.paths = "", nil
	}
}

// Proc is a command a test runs as a process of its own, its stdout and
// stderr in a file. Its methods are safe for concurrent use.
type Proc struct {
	Name    string
	LogPath string // the process's output
	PID     int
	Started time.Time // taken just before the exec

	cmd  *exec.Cmd
	done chan struct{}

	mu     sync.Mutex
	exited time.Time // when Wait returned
	err    error     // what Wait returned
}

// StartProc starts path with args, writing its output to logPath. The
// kernel kills the process should the test binary die first; otherwise
// stopping it is the caller's (Signal, then Done).
func StartProc(name, logPath, path string, args ...string) (*Proc, error) {
	f, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	p := &Proc{Name: name, LogPath: logPath, done: make(chan struct{})}
	p.cmd = exec.Command(path, args...)
	p.cmd.Stdout, p.cmd.Stderr = f, f
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	p.Started = time.Now()
	if err := p.cmd.Start(); err != nil {
		f.Close()
		return nil, err
	}
	p.PID = p.cmd.Process.Pid
	go func() {
		err := p.cmd.Wait()
		f.Close()
		p.mu.Lock()
		p.exited, p.err = time.Now(), err
		p.mu.Unlock()
		close(p.done)
	}()
	return p, nil
}

// Done is closed once the process has exited and been waited for.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Alive reports whether the process has not exited yet.
func (p *Proc) Alive() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// Signal sends sig to the process, unless it has exited.
func (p *Proc) Signal(sig syscall.Signal) {
	if p.Alive() {
		_ = p.cmd.Process.Signal(sig)
	}
}

// Wait waits up to limit for the process to exit and reports whether it
// did.
func (p *Proc) Wait(limit time.Duration) bool {
	select {
	case <-p.done:
		return true
	case <-time.After(limit):
		return false
	}
}

// Exit returns when the process exited and what its Wait returned; the
// zero time while it runs.
func (p *Proc) Exit() (time.Time, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.exited, p.err
}

// Output returns what the process wrote so far.
func (p *Proc) Output() string {
	out, _ := os.ReadFile(p.LogPath)
	return string(out)
}

// Tail returns the last n bytes of what the process wrote so far.
func (p *Proc) Tail(n int) string {
	out, _ := os.ReadFile(p.LogPath)
	if len(out) > n {
		out = out[len(out)-n:]
	}
	return string(out)
}
