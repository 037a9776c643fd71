package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/schema"
)

type cliBundle struct {
	store *schema.Store
	dir   string
}

// run executes phasecast with args against the bundle's schema.
func (b *cliBundle) run(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errOut bytes.Buffer
	full := append([]string{"--database-url", testenv.DatabaseURL(), "--schema", b.store.Schema()}, args...)
	code = Main(context.Background(), full, &out, &errOut)
	return code, out.String(), errOut.String()
}

// write puts a manifest into the bundle's directory and returns its path.
func (b *cliBundle) write(t *testing.T, name, body string) string {
	t.Helper()
	path := filepath.Join(b.dir, name)
	require.NoError(t, os.WriteFile(path, []byte(body), 0o600))
	return path
}

// tables captures every row phasecast keeps.
func (b *cliBundle) tables(t *testing.T) string {
	t.Helper()
	var rows []string
	for _, table := range []string{"epoch", "releases", "removals", "events", "audit"} {
		var r []string
		require.NoError(t, b.store.DB().Select(&r, fmt.Sprintf(`SELECT t::text FROM %q.%q t ORDER BY 1`, b.store.Schema(), table)))
		rows = append(rows, r...)
	}
	return strings.Join(rows, "\n")
}

func setupCLI(t *testing.T) (*cliBundle, string) {
	t.Helper()
	b := &cliBundle{store: testenv.Store(t), dir: t.TempDir()}
	table := b.store.Schema() + ".instances"
	_, err := b.store.DB().Exec(fmt.Sprintf(`CREATE TABLE %q.instances (id serial PRIMARY KEY, name text, common_name text)`, b.store.Schema()))
	require.NoError(t, err)
	manifest := b.write(t, "L.yaml", fmt.Sprintf(`release: L
description: merge name into common_name
expand:
  - ALTER TABLE %s ADD COLUMN IF NOT EXISTS display_name text
preconditions:
  - name: every instance has a common_name
    sql: SELECT 1 FROM %s WHERE common_name IS NULL LIMIT 1
removed:
  - table: %s
    columns: [name]
`, table, table, table))
	return b, manifest
}

func TestLifecycleThroughTheCLI(t *testing.T) {
	b, manifest := setupCLI(t)

	code, out, errOut := b.run(t, "migrate")
	require.Zero(t, code, errOut)
	require.Contains(t, out, "up to date")

	code, out, errOut = b.run(t, "release", "apply", manifest)
	require.Zero(t, code, errOut)
	require.Contains(t, out, "release L registered in expand (epoch 1)")

	code, out, _ = b.run(t, "release", "apply", manifest)
	require.Zero(t, code)
	require.Contains(t, out, "unchanged")

	code, out, errOut = b.run(t, "flip", "L", "migrate")
	require.Zero(t, code, errOut)
	require.Contains(t, out, "release L: expand → migrate (epoch 2)")

	code, out, errOut = b.run(t, "flip", "L", "contract", "--json")
	require.Zero(t, code, errOut)
	var res schema.FlipResult
	require.NoError(t, json.Unmarshal([]byte(out), &res))
	require.EqualValues(t, 3, res.Epoch)

	code, out, errOut = b.run(t, "rollback", "L")
	require.Zero(t, code, errOut)
	require.Contains(t, out, "contract → migrate")

	code, out, errOut = b.run(t, "status")
	require.Zero(t, code, errOut)
	require.Contains(t, out, "epoch 4")
	require.NotContains(t, out, "phasecast migrate", "a migrated store is not reported behind")
	require.Regexp(t, `L\s+migrate\s+4\s+`+b.store.Schema()+`\.instances\.name`, out)
	require.Contains(t, out, "contract → migrate")

	code, out, errOut = b.run(t, "status", "--json")
	require.Zero(t, code, errOut)
	var rep schema.Report
	require.NoError(t, json.Unmarshal([]byte(out), &rep))
	require.EqualValues(t, 4, rep.Epoch)
	require.Len(t, rep.RecentFlips, 4)
	require.Equal(t, rep.Version, rep.StoreVersion)

	// A store from before this binary's migrations 002 and 005 on: status
	// says so, and a flip refuses with what to do.
	q := `"` + b.store.Schema() + `"`
	_, err := b.store.DB().Exec(`ALTER TABLE ` + q + `.epoch DROP COLUMN state_digest; ALTER TABLE ` + q + `.releases DROP COLUMN contracting_by;
		DELETE FROM ` + q + `.schema_migrations WHERE version = 2 OR version >= 5`)
	require.NoError(t, err)
	var storeVersion int
	require.NoError(t, b.store.DB().Get(&storeVersion, `SELECT max(version) FROM `+q+`.schema_migrations`))
	code, out, errOut = b.run(t, "status")
	require.Zero(t, code, errOut)
	require.Contains(t, out, fmt.Sprintf("store schema version %d, this binary's %d: changes refuse until 'phasecast migrate' runs", storeVersion, rep.Version))
	code, _, errOut = b.run(t, "flip", "L", "contract")
	require.Equal(t, 1, code)
	require.Contains(t, errOut, "run 'phasecast migrate' first")
	code, _, errOut = b.run(t, "migrate")
	require.Zero(t, code, errOut)
	code, _, errOut = b.run(t, "flip", "L", "contract")
	require.Zero(t, code, errOut)
}

// TestBadInput: each mistake gets one line naming the problem, a non-zero
// exit and no change to the store.
func TestBadInput(t *testing.T) {
	b, manifest := setupCLI(t)
	code, _, errOut := b.run(t, "release", "apply", manifest)
	require.Zero(t, code, errOut)

	cases := []struct {
		name     string
		args     func() []string
		wantCode int
		wantErr  string
	}{
		{"malformed YAML", func() []string {
			return []string{"release", "apply", b.write(t, "bad.yaml", "release: [L\nremoved: {")}
		}, 1, "bad.yaml"},
		{"unknown key", func() []string {
			return []string{"release", "apply", b.write(t, "typo.yaml", "release: M\nremovd: []\n")}
		}, 1, "removd"},
		{"injection in an identifier", func() []string {
			return []string{"release", "apply", b.write(t, "evil.yaml", "release: M\nremoved:\n  - table: 'x\"; DROP TABLE t; --'\n")}
		}, 1, "double quote"},
		{"missing file", func() []string { return []string{"release", "apply", filepath.Join(b.dir, "nope.yaml")} }, 1, "nope.yaml"},
		{"unknown phase", func() []string { return []string{"flip", "L", "contracted"} }, 1, `unknown phase "contracted"`},
		{"unknown release", func() []string { return []string{"flip", "M", "migrate"} }, 1, `unknown release "M"`},
		{"refused transition", func() []string { return []string{"flip", "L", "contract"} }, 1, "allowed from expand: migrate"},
		{"the runner's phase", func() []string { return []string{"flip", "L", "complete"} }, 1, "run 'phasecast contract L'"},
		{"rollback from expand", func() []string { return []string{"rollback", "L"} }, 1, "contract to migrate only"},
		{"database that is not there", func() []string {
			return []string{"--database-url", "postgres://postgres:s3cret@127.0.0.1:1/postgres?sslmode=disable&connect_timeout=2", "status"}
		}, 1, "connect to postgres://postgres:xxxxx@127.0.0.1:1/"},
		{"wrong number of arguments", func() []string { return []string{"flip", "L"} }, 1, "accepts 2 arg(s)"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before := b.tables(t)
			code, _, errOut := b.run(t, c.args()...)
			require.Equal(t, c.wantCode, code, errOut)
			require.Contains(t, errOut, c.wantErr)
			require.Equal(t, 1, strings.Count(errOut, "\n"), "one line, never a stack trace: %q", errOut)
			require.True(t, strings.HasPrefix(errOut, "phasecast: "), errOut)
			require.NotContains(t, errOut, "s3cret")
			require.Equal(t, before, b.tables(t), "the store is unchanged")
		})
	}
}

func TestPreconditionExitCode(t *testing.T) {
	b, manifest := setupCLI(t)
	for _, args := range [][]string{{"release", "apply", manifest}, {"flip", "L", "migrate"}} {
		code, _, errOut := b.run(t, args...)
		require.Zero(t, code, errOut)
	}
	_, err := b.store.DB().Exec(fmt.Sprintf(`INSERT INTO %q.instances (name) VALUES ('x')`, b.store.Schema()))
	require.NoError(t, err)
	before := b.tables(t)
	code, _, errOut := b.run(t, "flip", "L", "contract")
	require.Equal(t, ExitPrecondition, code)
	require.Contains(t, errOut, `precondition "every instance has a common_name" returned a row`)
	require.Equal(t, before, b.tables(t))
}
