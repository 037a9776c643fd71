package schema

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"go.yaml.in/yaml/v3"
)

// FuzzParseManifest checks that no input panics the parser, that every
// error is a one-line *ManifestError, and that whatever is accepted stays
// valid through every path a manifest takes afterwards: the stored JSON, a
// YAML re-encoding, and generated DDL in which every identifier is quoted.
func FuzzParseManifest(f *testing.F) {
	files, err := filepath.Glob(filepath.Join("testdata", "manifests", "*.yaml"))
	require.NoError(f, err)
	for _, file := range files {
		data, err := os.ReadFile(file)
		require.NoError(f, err)
		f.Add(data)
	}
	for _, s := range []string{
		"release: R\nremoved:\n  - table: nova.instances\n    columns: [\"Name\", display name]\n    cascade: true\n",
		"release: R\nremoved:\n  - {schema: S, table: a.b}\n  - table: \"t\\0\"\n",
		"release: R\nremoved:\n  - table: t\n    columns: ['x\"; DROP TABLE t; --']\n",
		"release: R\nremoved: &x [*x]\n",
		"release: R\npreconditions:\n  - {name: n, sql: SELECT 1}\n  - {name: n, sql: SELECT 2}\n",
		"release: R\nexpand: [\"\"]\n",
		"---\n",
		"release: a\n---\nrelease: b\n",
	} {
		f.Add([]byte(s))
	}

	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := ParseManifest("f.yaml", data)
		if err != nil {
			var me *ManifestError
			require.True(t, errors.As(err, &me), "%T is not a *ManifestError: %v", err, err)
			require.Equal(t, "f.yaml", me.File)
			require.NotContains(t, err.Error(), "\n")
			require.Nil(t, m)
			return
		}
		require.NoError(t, m.Validate("f.yaml"), "a parsed manifest must validate again")
		digest := m.Digest()
		require.Equal(t, digest, m.Digest(), "Digest must be deterministic")

		// The store keeps the manifest as JSON and reloads it from there.
		b, err := json.Marshal(m)
		require.NoError(t, err)
		var stored Manifest
		require.NoError(t, json.Unmarshal(b, &stored))
		require.NoError(t, stored.Validate("stored"))
		require.Equal(t, digest, stored.Digest())
		require.Equal(t, m.DDL(), stored.DDL())

		// Written back out as YAML, it parses to the same manifest.
		y, err := yaml.Marshal(m)
		require.NoError(t, err)
		again, err := ParseManifest("again.yaml", y)
		require.NoError(t, err, "re-encoded as:\n%s", y)
		require.Equal(t, digest, again.Digest())

		ddl := m.DDL()
		require.Len(t, ddl, len(m.Removed))
		for i, r := range m.Removed {
			// Parsed manifests are normalized: a table with one dot and no
			// schema has been split.
			require.False(t, r.Schema == "" && strings.Contains(r.Table, "."), "unsplit table %q", r.Table)
			require.Equal(t, r.DDL(), ddl[i])

			schema, table, cols, cascade, err := parseDDL(ddl[i])
			require.NoError(t, err)
			require.Equal(t, r.Schema, schema)
			require.Equal(t, r.Table, table)
			require.Equal(t, r.Columns, cols)
			require.Equal(t, r.Cascade, cascade)

			// Key splits back at its first dot.
			key := r.Key()
			if r.Schema == "" {
				require.Equal(t, r.Table, key)
			} else {
				s, tb, ok := strings.Cut(key, ".")
				require.True(t, ok)
				require.Equal(t, r.Schema, s)
				require.Equal(t, r.Table, tb)
			}
		}
	})
}
