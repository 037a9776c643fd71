package fleet_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/cmd/phasecast/fleet"
)

// TestCheckPython: Debian's Python with the packages passes; a module it
// cannot import is named, with the one package to install for it.
func TestCheckPython(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	require.NoError(t, fleet.CheckPython(ctx, fleet.PythonModules), "this machine runs the Python agent")

	missing := []fleet.PythonModule{{Module: "json", Package: "python3-minimal"}, {Module: "phasecast_no_such_module", Package: "python3-phasecast-nosuch"}}
	err := fleet.CheckPython(ctx, missing)
	require.Error(t, err)
	require.Contains(t, err.Error(), "cannot import phasecast_no_such_module")
	require.Contains(t, err.Error(), "install with: apt-get install -y python3-phasecast-nosuch")
	require.NotContains(t, err.Error(), "python3-minimal", "a module that imports is not named")
}

// TestPythonDir finds the repository's python/ directory from below it.
func TestPythonDir(t *testing.T) {
	dir, err := fleet.PythonDir(".")
	require.NoError(t, err)
	require.FileExists(t, dir+"/"+fleet.NovalikePy)
	_, err = fleet.PythonDir(t.TempDir())
	require.ErrorContains(t, err, "run from the phasecast repository")
}
