package python

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/cmd/phasecast/fleet"
	"github.com/phasecast/phasecast/internal/config"
	"github.com/phasecast/phasecast/internal/testenv"
)

// ranLine is unittest's count of the tests it ran.
var ranLine = regexp.MustCompile(`(?m)^Ran (\d+) tests? in `)

// skippedCount is the count in unittest's "OK (skipped=N)" or
// "FAILED (…, skipped=N)".
var skippedCount = regexp.MustCompile(`skipped=(\d+)`)

// TestPythonUnitTests runs the Python agent's unit tests from the
// repository's root, as its README says, against the test servers. It
// fails if any test fails or errs, if none ran, and if any skipped: a
// missing server or package fails a test here, never skips it.
func TestPythonUnitTests(t *testing.T) {
	requirePython(t, fleet.PythonTestModules)
	root := filepath.Dir(pythonDir(t))
	// The servers must be there: a Python test that cannot reach them
	// fails anyway, but this says so first and plainly.
	testenv.DB(t)
	testenv.AMQP(t)

	// The Python tests drive the real broadcaster through the phasecast
	// command: built here, with the go that runs this test.
	bin := testenv.Build(t, "github.com/phasecast/phasecast/cmd/phasecast")[0]

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, fleet.Python, "-m", "unittest", "discover", "-s", "python/tests", "-v")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "PYTHONPATH="+filepath.Join(root, "python"), "PYTHONDONTWRITEBYTECODE=1", "PHASECAST_BIN="+bin,
		config.EnvDatabaseURL+"="+testenv.DatabaseURL(), config.EnvAMQPURL+"="+testenv.AMQPURL())
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "python -m unittest discover -s python/tests -v:\n%s", out)

	m := ranLine.FindSubmatch(out)
	require.NotNil(t, m, "no test count in:\n%s", out)
	ran, err := strconv.Atoi(string(m[1]))
	require.NoError(t, err)
	require.Positive(t, ran, "no Python test ran:\n%s", out)
	if s := skippedCount.FindSubmatch(out); s != nil {
		require.Equal(t, "0", string(s[1]), "Python tests skipped; none may (a missing server or package fails):\n%s", out)
	}
	t.Logf("%d Python tests passed", ran)
}
