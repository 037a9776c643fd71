package cli

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/keys"
)

func TestKeysGenerate(t *testing.T) {
	dir := t.TempDir()
	var out, errOut bytes.Buffer
	code := Main(context.Background(), []string{"keys", "generate", "--dir", dir}, &out, &errOut)
	require.Zero(t, code, errOut.String())
	for _, name := range []string{"state.key", "state.pub", "status.mac"} {
		require.Contains(t, out.String(), filepath.Join(dir, name))
	}
	info, err := os.Stat(filepath.Join(dir, "state.key"))
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), info.Mode().Perm(), "the private key is readable by its owner only")

	loaded, err := keys.Load(keys.LoadOptions{StateKeyFile: filepath.Join(dir, "state.key"), StatusMACFile: filepath.Join(dir, "status.mac")})
	require.NoError(t, err)
	require.NotNil(t, loaded.StatePrivate)
	require.NotNil(t, loaded.StatusMAC)

	out.Reset()
	errOut.Reset()
	code = Main(context.Background(), []string{"keys", "generate", "--dir", dir}, &out, &errOut)
	require.Equal(t, ExitError, code, "existing keys are never overwritten")
	require.Contains(t, errOut.String(), "state.key")
}
