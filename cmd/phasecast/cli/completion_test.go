package cli

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestCompletionScripts runs 'phasecast completion SHELL' for each shell
// cobra supports: each prints its script for phasecast.
func TestCompletionScripts(t *testing.T) {
	for shell, marker := range map[string]string{
		"bash":       "# bash completion V2 for phasecast",
		"zsh":        "#compdef phasecast",
		"fish":       "# fish completion for phasecast",
		"powershell": "# powershell completion for phasecast",
	} {
		code, out, errOut := runOffline(t, "completion", shell)
		require.Zero(t, code, "%s: %s", shell, errOut)
		require.True(t, strings.HasPrefix(out, marker), "%s script starts with %q:\n%.200s", shell, marker, out)
		require.Greater(t, strings.Count(out, "\n"), 20, "%s: a whole script", shell)
	}
	// A shell it does not know, or none, is an error, not the help on
	// stdout with exit 0 (which a redirect would write into a script).
	code, out, errOut := runOffline(t, "completion", "tcsh")
	require.Equal(t, ExitError, code, out)
	require.Empty(t, out)
	require.Equal(t, "phasecast: completion: \"tcsh\" is not a shell phasecast writes a script for (bash, zsh, fish or powershell)\n", errOut)
	code, out, errOut = runOffline(t, "completion")
	require.Equal(t, ExitError, code, out)
	require.Contains(t, errOut, "name a shell")
}

// TestCompletionCompletesCommands asks the scripts' back end what follows
// "phasecast ver" and "phasecast fl": the commands, version among them.
func TestCompletionCompletesCommands(t *testing.T) {
	code, out, errOut := runOffline(t, "__complete", "ver")
	require.Zero(t, code, errOut)
	require.Contains(t, out, "version\t")
	code, out, errOut = runOffline(t, "__complete", "fl")
	require.Zero(t, code, errOut)
	require.Contains(t, out, "flip\t")
	require.NotContains(t, out, "version")
}
