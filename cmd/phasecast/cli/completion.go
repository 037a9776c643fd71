package cli

import (
	"errors"
	"fmt"

	"github.com/spf13/cobra"
)

// completionShells are the shells cobra's completion command writes
// scripts for.
const completionShells = "bash, zsh, fish or powershell"

// setUpCompletion adds cobra's 'completion bash|zsh|fish|powershell' now
// rather than at Execute, so that a shell it does not know is an error:
// left to cobra, 'completion tcsh' prints the help and exits 0, and a
// script redirecting it into a file gets the help text.
func setUpCompletion(root *cobra.Command) {
	root.CompletionOptions.DisableDefaultCmd = false
	root.InitDefaultCompletionCmd()
	cmd, _, err := root.Find([]string{"completion"})
	if err != nil || cmd == root {
		return
	}
	cmd.Long += "\nShells: " + completionShells + ". For example, in bash:\n\n  source <(phasecast completion bash)\n"
	cmd.Args = func(_ *cobra.Command, args []string) error {
		if len(args) > 0 {
			return fmt.Errorf("completion: %q is not a shell phasecast writes a script for (%s)", args[0], completionShells)
		}
		return nil
	}
	cmd.RunE = func(*cobra.Command, []string) error {
		return errors.New("completion: name a shell: " + completionShells)
	}
}
