package python

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/cmd/phasecast/fleet"
	"github.com/phasecast/phasecast/internal/testenv"
)

// requirePython fails the test, saying what to install, unless Debian's
// Python imports every module.
func requirePython(t *testing.T, modules []fleet.PythonModule) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	require.NoError(t, fleet.CheckPython(ctx, modules))
}

// pythonDir is the repository's python/ directory.
func pythonDir(t *testing.T) string {
	t.Helper()
	dir, err := fleet.PythonDir(".")
	require.NoError(t, err)
	return dir
}

func TestMain(m *testing.M) {
	code := m.Run()
	testenv.RemoveBuilt()
	os.Exit(code)
}
