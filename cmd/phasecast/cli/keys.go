package cli

import (
	"fmt"
	"sort"

	"github.com/spf13/cobra"

	"github.com/phasecast/phasecast/internal/keys"
)

func init() { extraCommands = append(extraCommands, newKeysCmd) }

// keyFiles are the flags that point the broadcaster at its keys.
type keyFiles struct{ opts keys.LoadOptions }

func (k *keyFiles) register(cmd *cobra.Command) {
	f := cmd.Flags()
	f.StringVar(&k.opts.StateKeyFile, "state-key", "", "Ed25519 private key file that signs state and grants ($PHASECAST_STATE_KEY holds the key itself)")
	f.StringVar(&k.opts.StatusMACFile, "status-mac", "", "HMAC key file for status messages ($PHASECAST_STATUS_MAC)")
}

func (k *keyFiles) load() (keys.Keys, error) { return keys.Load(k.opts) }

func newKeysCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "keys", Short: "Manage the keys that sign state and grants and authenticate status"}
	var dir string
	gen := &cobra.Command{
		Use:   "generate",
		Short: "Write a new Ed25519 key pair (state.key, state.pub) and an HMAC key (status.mac)",
		Long: `Writes state.key (the broadcaster's Ed25519 private key, mode 0600), state.pub
(the public key every agent holds) and status.mac (the shared HMAC key for
status messages, mode 0600) into --dir. Existing files are never overwritten.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			k, err := keys.Generate()
			if err != nil {
				return err
			}
			paths, err := keys.WriteFiles(dir, k)
			if err != nil {
				return err
			}
			names := make([]string, 0, len(paths))
			for name := range paths {
				names = append(names, name)
			}
			sort.Strings(names)
			for _, name := range names {
				fmt.Fprintf(g.stdout, "wrote %s\n", paths[name])
			}
			return nil
		},
	}
	gen.Flags().StringVar(&dir, "dir", ".", "directory to write the key files into")
	cmd.AddCommand(gen)
	return cmd
}
