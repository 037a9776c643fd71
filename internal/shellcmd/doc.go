// Package shellcmd runs an operator's shell command as one step of a
// larger operation: through sh -c, in a process group of its own that goes
// when the step ends, with its output streamed line by line under a prefix
// and its last lines kept for a report. The contract runner's --exec runs
// the team's own contract tool with it.
package shellcmd
