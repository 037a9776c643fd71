package faults

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/testenv"
)

func TestMain(m *testing.M) {
	code := m.Run()
	testenv.RemoveBuilt()
	os.Exit(code)
}

// The commands the tests run as processes of their own, by binary name.
var packages = map[string]string{
	"phasecast": "github.com/phasecast/phasecast/cmd/phasecast",
	"novalike":  "github.com/phasecast/phasecast/examples/novalike/cmd/novalike",
}

// binary builds a command once per test run and returns its path.
func binary(t *testing.T, name string) string {
	t.Helper()
	return testenv.Build(t, packages[name])[0]
}

// startProc starts a process that is killed, if still running, when the
// test ends; its output is shown if the test failed.
func startProc(t *testing.T, name, path string, args ...string) *testenv.Proc {
	t.Helper()
	p, err := testenv.StartProc(name, filepath.Join(t.TempDir(), name+".log"), path, args...)
	require.NoError(t, err, "start %s", name)
	t.Cleanup(func() {
		p.Signal(syscall.SIGKILL)
		<-p.Done()
		if t.Failed() {
			t.Logf("%s's output (last 8000 bytes):\n%s", name, p.Tail(8000))
		}
	})
	return p
}

// waitExit waits for the process to exit.
func waitExit(t *testing.T, p *testenv.Proc, limit time.Duration) {
	t.Helper()
	if !p.Wait(limit) {
		t.Fatalf("%s did not exit within %s", p.Name, limit)
	}
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
