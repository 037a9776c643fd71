package keys_test

import (
	"crypto/ed25519"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/keys"
	"github.com/phasecast/phasecast/internal/wire"
)

// clearEnv makes sure the developer's own keys never leak into a test.
func clearEnv(t *testing.T) {
	t.Helper()
	for _, env := range []string{keys.EnvStateKey, keys.EnvStatePub, keys.EnvStatusMAC} {
		t.Setenv(env, "")
	}
}

func generate(t *testing.T) keys.Keys {
	t.Helper()
	k, err := keys.Generate()
	require.NoError(t, err)
	return k
}

func b64(raw []byte) string { return base64.StdEncoding.EncodeToString(raw) }

func writeFile(t *testing.T, name, text string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	require.NoError(t, os.WriteFile(path, []byte(text), 0o600))
	return path
}

// requireNoSecret fails if msg contains any 8-character run of a secret's
// base64 text: no prefix, no excerpt, no whole value.
func requireNoSecret(t *testing.T, msg string, secrets ...string) {
	t.Helper()
	for _, s := range secrets {
		for i := 0; i+8 <= len(s); i++ {
			require.NotContains(t, msg, s[i:i+8], "message leaks key material: %s", msg)
		}
	}
}

func TestGenerate(t *testing.T) {
	k := generate(t)
	require.Len(t, k.StatePrivate, ed25519.PrivateKeySize)
	require.Equal(t, k.StatePrivate.Public(), k.StatePublic)
	require.Len(t, k.StatusMAC, keys.MinMACSize)
	require.NotEqual(t, k, generate(t))

	// The keys work with the wire package.
	body := []byte(`{"v":1}`)
	require.NoError(t, wire.Verify(k.StatePublic, body, wire.Sign(k.StatePrivate, body)))
	require.NoError(t, wire.CheckMAC(k.StatusMAC, body, wire.MAC(k.StatusMAC, body)))
}

func TestStringHidesKeys(t *testing.T) {
	k := generate(t)
	for _, format := range []string{"%v", "%+v", "%#v", "%s"} {
		out := fmt.Sprintf(format, k)
		requireNoSecret(t, out, b64(k.StatePrivate.Seed()), b64(k.StatePrivate), b64(k.StatePublic), b64(k.StatusMAC))
		require.Contains(t, out, "state_private:true")
	}
}

func TestWriteFilesAndLoad(t *testing.T) {
	clearEnv(t)
	k := generate(t)
	dir := t.TempDir()
	paths, err := keys.WriteFiles(dir, k)
	require.NoError(t, err)
	require.Equal(t, map[string]string{
		keys.StateKeyFile:  filepath.Join(dir, "state.key"),
		keys.StatePubFile:  filepath.Join(dir, "state.pub"),
		keys.StatusMACFile: filepath.Join(dir, "status.mac"),
	}, paths)

	for name, mode := range map[string]os.FileMode{"state.key": 0o600, "state.pub": 0o644, "status.mac": 0o600} {
		fi, err := os.Stat(paths[name])
		require.NoError(t, err)
		require.Equal(t, mode, fi.Mode().Perm(), name)
		b, err := os.ReadFile(paths[name])
		require.NoError(t, err)
		require.Equal(t, 1, strings.Count(string(b), "\n"), "%s is one line", name)
		require.True(t, strings.HasSuffix(string(b), "\n"))
	}

	got, err := keys.Load(keys.LoadOptions{
		StateKeyFile:  paths[keys.StateKeyFile],
		StatePubFile:  paths[keys.StatePubFile],
		StatusMACFile: paths[keys.StatusMACFile],
	})
	require.NoError(t, err)
	require.Equal(t, k, got)

	t.Run("private key alone derives the public key", func(t *testing.T) {
		got, err := keys.Load(keys.LoadOptions{StateKeyFile: paths[keys.StateKeyFile]})
		require.NoError(t, err)
		require.Equal(t, k.StatePrivate, got.StatePrivate)
		require.Equal(t, k.StatePublic, got.StatePublic)
		require.Nil(t, got.StatusMAC)
	})

	t.Run("an agent loads only the public key", func(t *testing.T) {
		got, err := keys.Load(keys.LoadOptions{StatePubFile: paths[keys.StatePubFile]})
		require.NoError(t, err)
		require.Equal(t, keys.Keys{StatePublic: k.StatePublic}, got)
	})
}

func TestWriteFilesPartial(t *testing.T) {
	k := generate(t)
	dir := t.TempDir()
	paths, err := keys.WriteFiles(dir, keys.Keys{StatePrivate: k.StatePrivate})
	require.NoError(t, err)
	// The public key goes with the private one, so agents can be given it.
	require.Len(t, paths, 2)
	require.FileExists(t, paths[keys.StatePubFile])
	require.NoFileExists(t, filepath.Join(dir, keys.StatusMACFile))

	_, err = keys.WriteFiles(t.TempDir(), keys.Keys{})
	require.ErrorContains(t, err, "no key is configured")
}

// TestWriteFilesMakesTheDirectory: 'phasecast keys generate --dir D' with a
// D not there yet used to fail with "no such file or directory".
func TestWriteFilesMakesTheDirectory(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "keys", "fleet")
	paths, err := keys.WriteFiles(dir, generate(t))
	require.NoError(t, err)
	require.FileExists(t, paths[keys.StateKeyFile])
	info, err := os.Stat(dir)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o700), info.Mode().Perm(), "the directory holding the private key is private")
}

func TestWriteFilesRefusesToOverwrite(t *testing.T) {
	k := generate(t)
	dir := t.TempDir()
	existing := filepath.Join(dir, keys.StatusMACFile)
	require.NoError(t, os.WriteFile(existing, []byte("precious\n"), 0o600))

	paths, err := keys.WriteFiles(dir, k)
	require.ErrorIs(t, err, keys.ErrExists)
	require.ErrorContains(t, err, existing)
	require.Nil(t, paths)
	// Nothing was written, and the existing file is untouched.
	require.NoFileExists(t, filepath.Join(dir, keys.StateKeyFile))
	require.NoFileExists(t, filepath.Join(dir, keys.StatePubFile))
	b, err := os.ReadFile(existing)
	require.NoError(t, err)
	require.Equal(t, "precious\n", string(b))

	// A second run over a complete set is refused too.
	dir = t.TempDir()
	_, err = keys.WriteFiles(dir, k)
	require.NoError(t, err)
	_, err = keys.WriteFiles(dir, generate(t))
	require.ErrorIs(t, err, keys.ErrExists)
	got, err := keys.Load(keys.LoadOptions{StateKeyFile: filepath.Join(dir, keys.StateKeyFile)})
	require.NoError(t, err)
	require.Equal(t, k.StatePrivate, got.StatePrivate)
}

func TestWriteFilesRefusesBadKeys(t *testing.T) {
	k, other := generate(t), generate(t)
	for name, bad := range map[string]keys.Keys{
		"short private":    {StatePrivate: k.StatePrivate[:32]},
		"short public":     {StatePublic: k.StatePublic[:31]},
		"mismatched pair":  {StatePrivate: k.StatePrivate, StatePublic: other.StatePublic},
		"short status mac": {StatusMAC: make([]byte, 16)},
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			_, err := keys.WriteFiles(dir, bad)
			require.Error(t, err)
			entries, err := os.ReadDir(dir)
			require.NoError(t, err)
			require.Empty(t, entries)
		})
	}
}

func TestLoadEnvFallback(t *testing.T) {
	clearEnv(t)
	k := generate(t)

	t.Run("nothing configured", func(t *testing.T) {
		got, err := keys.Load(keys.LoadOptions{})
		require.NoError(t, err)
		require.Equal(t, keys.Keys{}, got)
		require.Nil(t, got.StatePrivate)
		require.Nil(t, got.StatePublic)
		require.Nil(t, got.StatusMAC)
	})

	t.Run("values from the environment", func(t *testing.T) {
		t.Setenv(keys.EnvStateKey, b64(k.StatePrivate.Seed()))
		t.Setenv(keys.EnvStatePub, b64(k.StatePublic))
		t.Setenv(keys.EnvStatusMAC, " "+b64(k.StatusMAC)+"\n")
		got, err := keys.Load(keys.LoadOptions{})
		require.NoError(t, err)
		require.Equal(t, k, got)
	})

	t.Run("a file wins over the environment", func(t *testing.T) {
		other := generate(t)
		t.Setenv(keys.EnvStatusMAC, b64(other.StatusMAC))
		got, err := keys.Load(keys.LoadOptions{StatusMACFile: writeFile(t, "status.mac", b64(k.StatusMAC)+"\n")})
		require.NoError(t, err)
		require.Equal(t, k.StatusMAC, got.StatusMAC)
	})

	t.Run("64-byte private key form and unpadded base64", func(t *testing.T) {
		t.Setenv(keys.EnvStateKey, base64.RawStdEncoding.EncodeToString(k.StatePrivate))
		got, err := keys.Load(keys.LoadOptions{})
		require.NoError(t, err)
		require.Equal(t, k.StatePrivate, got.StatePrivate)
		require.Equal(t, k.StatePublic, got.StatePublic)
	})
}

func TestLoadRejects(t *testing.T) {
	clearEnv(t)
	k, other := generate(t), generate(t)
	tampered := append(ed25519.PrivateKey{}, k.StatePrivate...)
	copy(tampered[32:], other.StatePublic)
	secrets := []string{
		b64(k.StatePrivate.Seed()), b64(k.StatePrivate), b64(k.StatePublic), b64(k.StatusMAC),
		b64(other.StatePublic), b64(tampered),
	}
	corrupt := func(s string) string { return s[:20] + "*" + s[21:] }

	for _, tc := range []struct {
		name  string
		env   map[string]string // set for the case
		files map[string]string // LoadOptions field → file contents
		want  string            // in the error
	}{
		{name: "private key too short", env: map[string]string{keys.EnvStateKey: b64(k.StatePrivate[:31])},
			want: "environment variable PHASECAST_STATE_KEY: Ed25519 private key is 31 bytes, want 32 (seed) or 64"},
		{name: "private key too long", files: map[string]string{"StateKeyFile": b64(append(k.StatePrivate, 0))},
			want: "Ed25519 private key is 65 bytes"},
		{name: "private halves disagree", env: map[string]string{keys.EnvStateKey: b64(tampered)},
			want: "PHASECAST_STATE_KEY: not an Ed25519 private key"},
		{name: "public key wrong length", env: map[string]string{keys.EnvStatePub: b64(k.StatusMAC[:16])},
			want: "PHASECAST_STATE_PUB: Ed25519 public key is 16 bytes, want 32"},
		{name: "public key of another pair", env: map[string]string{keys.EnvStateKey: b64(k.StatePrivate.Seed()), keys.EnvStatePub: b64(other.StatePublic)},
			want: "PHASECAST_STATE_PUB: public key does not belong to the private key (environment variable PHASECAST_STATE_KEY)"},
		{name: "mac key too short", env: map[string]string{keys.EnvStatusMAC: b64(k.StatusMAC[:31])},
			want: "PHASECAST_STATUS_MAC: HMAC key is 31 bytes, want 32 to 1024"},
		{name: "mac key too long", files: map[string]string{"StatusMACFile": b64(make([]byte, 1025))},
			want: "HMAC key is 1025 bytes"},
		{name: "bad base64 in env", env: map[string]string{keys.EnvStateKey: corrupt(b64(k.StatePrivate))},
			want: "environment variable PHASECAST_STATE_KEY: not valid base64 (at byte 20)"},
		{name: "bad base64 in file", files: map[string]string{"StatusMACFile": corrupt(b64(k.StatusMAC)) + "\n"},
			want: "not valid base64"},
		{name: "a PEM file", files: map[string]string{"StatePubFile": "-----BEGIN PUBLIC KEY-----\n" + b64(k.StatePublic) + "\n-----END PUBLIC KEY-----\n"},
			want: "not valid base64"},
		{name: "empty file", files: map[string]string{"StatusMACFile": "\n"},
			want: "file is empty"},
		{name: "base64 of nothing", env: map[string]string{keys.EnvStatusMAC: "===="},
			want: "PHASECAST_STATUS_MAC"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for env, v := range tc.env {
				t.Setenv(env, v)
			}
			var opts keys.LoadOptions
			var paths []string
			for field, text := range tc.files {
				path := writeFile(t, field, text)
				paths = append(paths, path)
				switch field {
				case "StateKeyFile":
					opts.StateKeyFile = path
				case "StatePubFile":
					opts.StatePubFile = path
				case "StatusMACFile":
					opts.StatusMACFile = path
				}
			}
			msg := errString(t, opts)
			require.Contains(t, msg, tc.want)
			for _, path := range paths {
				require.Contains(t, msg, "key file "+path+": ")
			}
			requireNoSecret(t, msg, secrets...)
			for _, v := range tc.env {
				requireNoSecret(t, msg, strings.TrimRight(v, "="))
			}
			for _, text := range tc.files {
				for _, line := range strings.Split(text, "\n") {
					if !strings.HasPrefix(line, "-----") {
						requireNoSecret(t, msg, line)
					}
				}
			}
		})
	}
}

func TestLoadMissingFile(t *testing.T) {
	clearEnv(t)
	t.Setenv(keys.EnvStatePub, b64(generate(t).StatePublic))
	missing := filepath.Join(t.TempDir(), "state.pub")
	_, err := keys.Load(keys.LoadOptions{StatePubFile: missing})
	require.ErrorIs(t, err, os.ErrNotExist, "a named file that is missing does not fall back to the environment")
	require.ErrorContains(t, err, missing)
}

func errString(t *testing.T, opts keys.LoadOptions) string {
	t.Helper()
	got, err := keys.Load(opts)
	require.Error(t, err)
	require.Equal(t, keys.Keys{}, got)
	require.False(t, errors.Is(err, keys.ErrExists))
	return err.Error()
}
