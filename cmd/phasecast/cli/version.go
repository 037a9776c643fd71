package cli

import (
	"fmt"
	"runtime"
	"runtime/debug"

	"github.com/spf13/cobra"
)

func init() { extraCommands = append(extraCommands, newVersionCmd) }

// BuildVersion is what the binary knows of its own build, from the build
// information the Go toolchain embeds.
type BuildVersion struct {
	Module string `json:"module"`
	// Version is the module version: a tag or pseudo-version when built
	// with go install module@version or from a git checkout, "(devel)"
	// when the toolchain recorded none.
	Version string `json:"version"`
	// Revision, RevisionTime and Modified come from the VCS stamp, which
	// go build records in a git checkout unless -buildvcs=false; go run
	// and go test record none, nor does a build in a linked git worktree
	// (golang/go#58218).
	Revision     string `json:"revision,omitempty"`
	RevisionTime string `json:"revision_time,omitempty"`
	Modified     bool   `json:"modified"`
	GoVersion    string `json:"go_version"`
	Platform     string `json:"platform"`
}

// buildVersion reads a BuildVersion from build information; ok is
// debug.ReadBuildInfo's second result.
func buildVersion(bi *debug.BuildInfo, ok bool) BuildVersion {
	v := BuildVersion{Version: "unknown", GoVersion: runtime.Version(), Platform: runtime.GOOS + "/" + runtime.GOARCH}
	if !ok || bi == nil {
		return v
	}
	v.Module, v.Version = bi.Main.Path, bi.Main.Version
	if v.Version == "" {
		v.Version = "(devel)"
	}
	if bi.GoVersion != "" {
		v.GoVersion = bi.GoVersion
	}
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			v.Revision = s.Value
		case "vcs.time":
			v.RevisionTime = s.Value
		case "vcs.modified":
			v.Modified = s.Value == "true"
		}
	}
	return v
}

func newVersionCmd(g *globals) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "version",
		Short: "Print the module version, VCS revision and Go version this binary was built from",
		Long: `Prints the module version, the VCS revision (and whether the tree had
uncommitted changes), the revision's commit time and the Go version and
platform, as the Go toolchain recorded them in the binary. A binary built by
go run, go test or with -buildvcs=false carries no revision.`,
		Args: cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			v := buildVersion(debug.ReadBuildInfo())
			if asJSON {
				return writeJSON(g.stdout, v)
			}
			writeVersion(g, v)
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the result as JSON")
	return cmd
}

func writeVersion(g *globals, v BuildVersion) {
	fmt.Fprintf(g.stdout, "phasecast %s\n", v.Version)
	if v.Module != "" {
		fmt.Fprintf(g.stdout, "  module     %s\n", v.Module)
	}
	switch {
	case v.Revision == "":
		fmt.Fprintf(g.stdout, "  revision   not recorded (go run, go test, -buildvcs=false, a linked git worktree, or no git checkout)\n")
	case v.Modified:
		fmt.Fprintf(g.stdout, "  revision   %s (with uncommitted changes)\n", v.Revision)
	default:
		fmt.Fprintf(g.stdout, "  revision   %s\n", v.Revision)
	}
	if v.RevisionTime != "" {
		fmt.Fprintf(g.stdout, "  committed  %s\n", v.RevisionTime)
	}
	fmt.Fprintf(g.stdout, "  go         %s %s\n", v.GoVersion, v.Platform)
}
