package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"runtime"
	"runtime/debug"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// runOffline runs phasecast with args; the commands it is for touch no
// server.
func runOffline(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errOut bytes.Buffer
	code = Main(context.Background(), args, &out, &errOut)
	return code, out.String(), errOut.String()
}

// TestVersionCommand runs 'phasecast version' and 'version --json' on the
// test binary's own build information: the module, its version and the
// Go version are printed, and the JSON says the same.
func TestVersionCommand(t *testing.T) {
	bi, ok := debug.ReadBuildInfo()
	require.True(t, ok, "the test binary carries build information")

	code, out, errOut := runOffline(t, "version")
	require.Zero(t, code, errOut)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	require.Equal(t, "phasecast "+bi.Main.Version, lines[0], out)
	require.Contains(t, out, "  module     github.com/phasecast/phasecast\n")
	require.Contains(t, out, "  go         "+runtime.Version()+" "+runtime.GOOS+"/"+runtime.GOARCH+"\n")
	require.Contains(t, out, "  revision   ", out)

	code, out, errOut = runOffline(t, "version", "--json")
	require.Zero(t, code, errOut)
	var v BuildVersion
	require.NoError(t, json.Unmarshal([]byte(out), &v), out)
	require.Equal(t, BuildVersion{
		Module: "github.com/phasecast/phasecast", Version: bi.Main.Version,
		Revision: v.Revision, RevisionTime: v.RevisionTime, Modified: v.Modified,
		GoVersion: runtime.Version(), Platform: runtime.GOOS + "/" + runtime.GOARCH,
	}, v)

	code, _, errOut = runOffline(t, "version", "extra")
	require.Equal(t, ExitError, code)
	require.Contains(t, errOut, "unknown command \"extra\"")
}

// TestVersionReadsTheVCSStamp feeds buildVersion what go build records in
// a git checkout, and what a build without module information gives.
func TestVersionReadsTheVCSStamp(t *testing.T) {
	bi := &debug.BuildInfo{
		GoVersion: "go1.99.1",
		Main:      debug.Module{Path: "github.com/phasecast/phasecast", Version: "v0.0.0-20261201225607-0fba217d605a+dirty"},
		Settings: []debug.BuildSetting{
			{Key: "vcs", Value: "git"},
			{Key: "vcs.revision", Value: "0fba217d605aea0b8b92e93ca975e608832cb755"},
			{Key: "vcs.time", Value: "2026-12-01T22:56:07Z"},
			{Key: "vcs.modified", Value: "true"},
		},
	}
	v := buildVersion(bi, true)
	require.Equal(t, BuildVersion{
		Module: "github.com/phasecast/phasecast", Version: "v0.0.0-20261201225607-0fba217d605a+dirty",
		Revision: "0fba217d605aea0b8b92e93ca975e608832cb755", RevisionTime: "2026-12-01T22:56:07Z", Modified: true,
		GoVersion: "go1.99.1", Platform: runtime.GOOS + "/" + runtime.GOARCH,
	}, v)
	var out bytes.Buffer
	writeVersion(&globals{stdout: &out}, v)
	require.Equal(t, "phasecast v0.0.0-20261201225607-0fba217d605a+dirty\n"+
		"  module     github.com/phasecast/phasecast\n"+
		"  revision   0fba217d605aea0b8b92e93ca975e608832cb755 (with uncommitted changes)\n"+
		"  committed  2026-12-01T22:56:07Z\n"+
		"  go         go1.99.1 "+runtime.GOOS+"/"+runtime.GOARCH+"\n", out.String())

	none := buildVersion(nil, false)
	require.Equal(t, "unknown", none.Version)
	require.Equal(t, runtime.Version(), none.GoVersion)
	require.Empty(t, none.Revision)
}
