package shellcmd

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// syncBuffer is a bytes.Buffer safe to read while Run writes to it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func TestRunReportsExitStatusAndOutput(t *testing.T) {
	var out syncBuffer
	res, err := Run(context.Background(), Spec{
		Command:   `echo one; echo "two $GREETING" >&2; printf 'no newline s3cret'; exit 3`,
		Env:       []string{"GREETING=hello"},
		Output:    &out,
		Prefix:    "cmd| ",
		Redact:    []string{"s3cret"},
		TailLines: 2,
	})
	var exitErr *exec.ExitError
	require.ErrorAs(t, err, &exitErr)
	require.Equal(t, 3, res.ExitCode)
	require.Empty(t, res.Signal)
	require.Equal(t, "cmd| one\ncmd| two hello\ncmd| no newline xxxxx\n", out.String())
	require.Equal(t, []string{"two hello", "no newline xxxxx"}, res.Tail, "the last two lines, in order")

	res, err = Run(context.Background(), Spec{Command: "true"})
	require.NoError(t, err)
	require.Zero(t, res.ExitCode)
	require.Equal(t, []string{}, res.Tail)
}

// pidAlive reports whether a process with pid exists (and is not a zombie
// of ours: sh's children are reparented, so they are reaped elsewhere).
func pidAlive(pid int) bool {
	return syscall.Kill(pid, 0) == nil
}

func startedPID(t *testing.T, path string) int {
	t.Helper()
	var pid int
	require.Eventually(t, func() bool {
		b, err := os.ReadFile(path)
		if err != nil {
			return false
		}
		pid, err = strconv.Atoi(strings.TrimSpace(string(b)))
		return err == nil
	}, 5*time.Second, 10*time.Millisecond)
	return pid
}

// TestRunKillsItsProcessGroupWhenCtxEnds: a command and what it started
// in the background are gone once ctx ends, SIGKILLed when they ignore
// SIGTERM for longer than Grace.
func TestRunKillsItsProcessGroupWhenCtxEnds(t *testing.T) {
	dir := t.TempDir()
	pidFile := filepath.Join(dir, "child")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	var res Result
	var err error
	go func() {
		defer close(done)
		res, err = Run(ctx, Spec{
			Command: `trap '' TERM; sh -c 'trap "" TERM; echo $$ > ` + pidFile + `; exec sleep 60' & wait`,
			Grace:   200 * time.Millisecond,
		})
	}()
	child := startedPID(t, pidFile)
	require.True(t, pidAlive(child))
	cancel()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after ctx ended")
	}
	require.ErrorIs(t, err, context.Canceled)
	require.Equal(t, "killed", res.Signal)
	require.Eventually(t, func() bool { return !pidAlive(child) }, 5*time.Second, 10*time.Millisecond, "the background child is killed with the group")
}

// TestRunKillsLeftoversWhenTheCommandExits: a process the command left
// running in the background goes when the command exits, and does not
// hold Run up.
func TestRunKillsLeftoversWhenTheCommandExits(t *testing.T) {
	pidFile := filepath.Join(t.TempDir(), "child")
	start := time.Now()
	res, err := Run(context.Background(), Spec{
		Command: `sh -c 'echo $$ > ` + pidFile + `; exec sleep 60' & while [ ! -s ` + pidFile + ` ]; do sleep 0.01; done; echo done`,
		Grace:   time.Second,
	})
	require.NoError(t, err)
	require.Zero(t, res.ExitCode)
	require.Equal(t, []string{"done"}, res.Tail)
	require.Less(t, time.Since(start), 10*time.Second)
	child := startedPID(t, pidFile)
	require.Eventually(t, func() bool { return !pidAlive(child) }, 5*time.Second, 10*time.Millisecond)
}

func TestRunNeverStartsOnEndedCtx(t *testing.T) {
	marker := filepath.Join(t.TempDir(), "ran")
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	res, err := Run(ctx, Spec{Command: "touch " + marker})
	require.ErrorIs(t, err, context.Canceled)
	require.Equal(t, -1, res.ExitCode)
	require.NoFileExists(t, marker)
}
