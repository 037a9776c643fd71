package schema

import (
	"errors"
	"io/fs"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestLoadManifest(t *testing.T) {
	m, err := LoadManifest(filepath.Join("testdata", "manifests", "release-L.yaml"))
	require.NoError(t, err)
	require.Equal(t, &Manifest{
		Release:     "L",
		Description: "merge name and display_name into common_name",
		Expand:      []string{"ALTER TABLE instances ADD COLUMN IF NOT EXISTS common_name text"},
		Preconditions: []Precondition{{
			Name: "every instance has a common_name",
			SQL:  "SELECT 1 FROM instances WHERE common_name IS NULL LIMIT 1",
		}},
		Removed: []Removal{
			{Table: "instances", Columns: []string{"name", "display_name"}},
			{Table: "legacy_flavors"},
		},
	}, m)
	require.Equal(t, []string{
		`ALTER TABLE "instances" DROP COLUMN IF EXISTS "name", DROP COLUMN IF EXISTS "display_name"`,
		`DROP TABLE IF EXISTS "legacy_flavors"`,
	}, m.DDL())
}

func TestLoadManifestFiles(t *testing.T) {
	tests := []struct {
		file    string
		wantErr string // empty: the file must load
	}{
		{file: "release-L.yaml"},
		{file: "quoting.yaml"},
		{file: "no-removals.yaml"},
		{file: "two-documents.yaml", wantErr: "two-documents.yaml: more than one YAML document (a second starts at line 2); put one release in each file"},
		{file: "injection.yaml", wantErr: `injection.yaml: removed[0].columns[1]: column "x\"; DROP TABLE t; --": identifier contains a double quote (line 6)`},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			path := filepath.Join("testdata", "manifests", tt.file)
			m, err := LoadManifest(path)
			if tt.wantErr == "" {
				require.NoError(t, err)
				require.NoError(t, m.Validate(path))
				return
			}
			require.Nil(t, m)
			var me *ManifestError
			require.ErrorAs(t, err, &me)
			require.Equal(t, path, me.File)
			require.Equal(t, filepath.Join("testdata", "manifests", tt.wantErr), err.Error())
		})
	}
}

func TestLoadManifestMissingFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "nope.yaml")
	_, err := LoadManifest(path)
	require.ErrorIs(t, err, fs.ErrNotExist)
	require.ErrorContains(t, err, path)
}

func TestParseManifestAccepts(t *testing.T) {
	tests := []struct {
		name string
		yaml string
		want Manifest
	}{
		{
			name: "release only",
			yaml: "release: R1\n",
			want: Manifest{Release: "R1"},
		},
		{
			name: "release name keeps its spelling when YAML would read a number",
			yaml: "release: 007\n",
			want: Manifest{Release: "007"},
		},
		{
			name: "release name of 63 characters",
			yaml: "release: " + strings.Repeat("r", 63) + "\n",
			want: Manifest{Release: strings.Repeat("r", 63)},
		},
		{
			name: "empty lists",
			yaml: "release: R\nexpand: []\npreconditions: []\nremoved: []\n",
			want: Manifest{Release: "R", Expand: []string(nil), Preconditions: []Precondition(nil), Removed: []Removal(nil)},
		},
		{
			name: "null lists and null cascade",
			yaml: "release: R\nexpand:\nremoved:\n  - table: t\n    cascade:\n",
			want: Manifest{Release: "R", Removed: []Removal{{Table: "t"}}},
		},
		{
			name: "schema-qualified table is split",
			yaml: "release: R\nremoved:\n  - table: nova.instances\n    columns: [a]\n",
			want: Manifest{Release: "R", Removed: []Removal{{Schema: "nova", Table: "instances", Columns: []string{"a"}}}},
		},
		{
			name: "schema given on its own; a dot in the table is then part of its name",
			yaml: "release: R\nremoved:\n  - schema: nova\n    table: a.b\n",
			want: Manifest{Release: "R", Removed: []Removal{{Schema: "nova", Table: "a.b"}}},
		},
		{
			name: "identifiers that need quoting",
			yaml: "release: R\nremoved:\n  - table: \"My Table\"\n    columns: [\"Name\", display name, café, \"it's\"]\n",
			want: Manifest{Release: "R", Removed: []Removal{{Table: "My Table", Columns: []string{"Name", "display name", "café", "it's"}}}},
		},
		{
			name: "identifier of exactly 63 bytes",
			yaml: "release: R\nremoved:\n  - table: " + strings.Repeat("t", 63) + "\n",
			want: Manifest{Release: "R", Removed: []Removal{{Table: strings.Repeat("t", 63)}}},
		},
		{
			name: "same column name in two tables",
			yaml: "release: R\nremoved:\n  - {table: a, columns: [x]}\n  - {table: b, columns: [x]}\n",
			want: Manifest{Release: "R", Removed: []Removal{{Table: "a", Columns: []string{"x"}}, {Table: "b", Columns: []string{"x"}}}},
		},
		{
			name: "same table name in two schemas",
			yaml: "release: R\nremoved:\n  - table: a.t\n  - table: b.t\n  - table: t\n",
			want: Manifest{Release: "R", Removed: []Removal{{Schema: "a", Table: "t"}, {Schema: "b", Table: "t"}, {Table: "t"}}},
		},
		{
			name: "anchors and aliases",
			yaml: "release: R\nremoved:\n  - table: a\n    columns: &cols [x, y]\n  - table: b\n    columns: *cols\n",
			want: Manifest{Release: "R", Removed: []Removal{{Table: "a", Columns: []string{"x", "y"}}, {Table: "b", Columns: []string{"x", "y"}}}},
		},
		{
			name: "explicit document markers",
			yaml: "---\nrelease: R\n...\n",
			want: Manifest{Release: "R"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, err := ParseManifest("m.yaml", []byte(tt.yaml))
			require.NoError(t, err)
			require.Equal(t, &tt.want, m)
		})
	}
}

func TestParseManifestRejects(t *testing.T) {
	tests := []struct {
		name    string
		yaml    string
		entry   string
		problem string // must appear in the error
	}{
		// The file as a whole.
		{name: "empty file", yaml: "", problem: "manifest is empty"},
		{name: "only comments", yaml: "# nothing here\n", problem: "manifest is empty"},
		{name: "null document", yaml: "---\n", problem: "manifest is empty"},
		{name: "two documents", yaml: "release: a\n---\nrelease: b\n", problem: "more than one YAML document (a second starts at line 2)"},
		{name: "trailing empty document", yaml: "release: a\n---\n", problem: "more than one YAML document"},
		{name: "syntax error", yaml: "release: [a\n", problem: "invalid YAML: line 1: did not find expected ',' or ']'"},
		{name: "tab indentation", yaml: "release: a\n\tremoved: []\n", problem: "invalid YAML: "},
		{name: "syntax error in second document", yaml: "release: a\n---\n[\n", problem: "invalid YAML: "},
		{name: "top level is a list", yaml: "- release: a\n", problem: "must be a mapping with release, description, expand, preconditions and removed, got a list (line 1)"},
		{name: "top level is a string", yaml: "release\n", problem: `got the string "release"`},

		// Keys.
		{name: "unknown top-level key", yaml: "release: a\nremove: []\n", problem: `unknown key "remove" (known keys: release, description, expand, preconditions, removed) (line 2)`},
		{name: "key differs in case", yaml: "Release: a\n", problem: `unknown key "Release"`},
		{name: "duplicate top-level key", yaml: "release: a\nrelease: b\n", problem: `key "release" given twice (first at line 1) (line 2)`},
		{name: "unknown removal key", yaml: "release: a\nremoved:\n  - table: t\n    colums: [x]\n", entry: "removed[0]", problem: `unknown key "colums" (known keys: schema, table, columns, cascade) (line 4)`},
		{name: "duplicate removal key", yaml: "release: a\nremoved:\n  - table: t\n    table: u\n", entry: "removed[0]", problem: `key "table" given twice`},
		{name: "unknown precondition key", yaml: "release: a\npreconditions:\n  - name: n\n    query: SELECT 1\n", entry: "preconditions[0]", problem: `unknown key "query" (known keys: name, sql)`},
		{name: "merge key", yaml: "release: a\nremoved:\n  - &base {table: t}\n  - <<: *base\n", entry: "removed[1]", problem: "merge keys (<<) are not supported"},
		{name: "non-scalar key", yaml: "release: a\n? [x]\n: y\n", problem: "keys must be plain names, got a list"},

		// release.
		{name: "release missing", yaml: "description: d\n", entry: "release", problem: "release name is required"},
		{name: "release null", yaml: "release: ~\n", entry: "release", problem: "release name is required (line 1)"},
		{name: "release too long", yaml: "release: " + strings.Repeat("r", 64) + "\n", entry: "release", problem: "release name is 64 characters; the limit is 63"},
		{name: "release starts with a dot", yaml: "release: .hidden\n", entry: "release", problem: `release name ".hidden" must start with a letter or digit`},
		{name: "release starts with a dash", yaml: "release: -x\n", entry: "release", problem: "must start with a letter or digit"},
		{name: "release with a space", yaml: "release: my release\n", entry: "release", problem: `release name "my release" may hold only letters, digits, '.', '_' and '-'`},
		{name: "release with a slash", yaml: "release: a/b\n", entry: "release", problem: "may hold only letters, digits"},
		{name: "release non-ASCII", yaml: "release: café\n", entry: "release", problem: "may hold only letters, digits"},
		{name: "release is a list", yaml: "release: [a]\n", entry: "release", problem: "must be a string, got a list"},
		{name: "release is binary", yaml: "release: !!binary YWJj\n", entry: "release", problem: "must be a string"},

		// description.
		{name: "description is a mapping", yaml: "release: a\ndescription: {x: y}\n", entry: "description", problem: "must be a string, got a mapping"},

		// expand.
		{name: "expand is a string", yaml: "release: a\nexpand: ALTER TABLE t ADD COLUMN c int\n", entry: "expand", problem: `must be a list of SQL statements, got the string "ALTER TABLE t ADD COLUMN c int" (line 2)`},
		{name: "expand entry empty", yaml: "release: a\nexpand:\n  - SELECT 1\n  - SELECT 2\n  - \"  \"\n", entry: "expand[2]", problem: "statement is empty (line 5)"},
		{name: "expand entry null", yaml: "release: a\nexpand:\n  -\n", entry: "expand[0]", problem: "statement is empty"},
		{name: "expand entry is a list", yaml: "release: a\nexpand:\n  - [SELECT 1]\n", entry: "expand[0]", problem: "must be a string, got a list"},

		// preconditions.
		{name: "preconditions is a mapping", yaml: "release: a\npreconditions: {name: n, sql: s}\n", entry: "preconditions", problem: "must be a list of preconditions (name and sql), got a mapping"},
		{name: "precondition is a string", yaml: "release: a\npreconditions:\n  - SELECT 1\n", entry: "preconditions[0]", problem: `must be a mapping with name and sql, got the string "SELECT 1"`},
		{name: "precondition without name", yaml: "release: a\npreconditions:\n  - sql: SELECT 1\n", entry: "preconditions[0].name", problem: "name is required (line 3)"},
		{name: "precondition with blank name", yaml: "release: a\npreconditions:\n  - {name: \" \", sql: SELECT 1}\n", entry: "preconditions[0].name", problem: "name is required"},
		{name: "precondition without sql", yaml: "release: a\npreconditions:\n  - name: n\n", entry: "preconditions[0].sql", problem: "sql is required"},
		{name: "precondition names not unique", yaml: "release: a\npreconditions:\n  - {name: n, sql: SELECT 1}\n  - {name: m, sql: SELECT 1}\n  - {name: n, sql: SELECT 2}\n", entry: "preconditions[2].name", problem: `precondition "n" is already defined at preconditions[0] (line 5)`},

		// removed: shape and types.
		{name: "removed is a mapping", yaml: "release: a\nremoved: {table: t}\n", entry: "removed", problem: "must be a list of removals (table, columns), got a mapping"},
		{name: "removal is a string", yaml: "release: a\nremoved: [t]\n", entry: "removed[0]", problem: `must be a mapping with table and, optionally, schema, columns and cascade, got the string "t"`},
		{name: "columns is a string", yaml: "release: a\nremoved:\n  - {table: t, columns: x}\n", entry: "removed[0].columns", problem: `must be a list of column names, got the string "x"`},
		{name: "column is a mapping", yaml: "release: a\nremoved:\n  - {table: t, columns: [{x: y}]}\n", entry: "removed[0].columns[0]", problem: "must be a string, got a mapping"},
		{name: "cascade is a quoted string", yaml: "release: a\nremoved:\n  - {table: t, cascade: \"true\"}\n", entry: "removed[0].cascade", problem: `must be true or false (unquoted), got the string "true" (line 3)`},
		{name: "cascade is yes", yaml: "release: a\nremoved:\n  - {table: t, cascade: yes}\n", entry: "removed[0].cascade", problem: `must be true or false (unquoted), got the string "yes"`},
		{name: "cascade is a number", yaml: "release: a\nremoved:\n  - {table: t, cascade: 1}\n", entry: "removed[0].cascade", problem: `must be true or false (unquoted), got "1" (int)`},
		{name: "cascade is a list", yaml: "release: a\nremoved:\n  - {table: t, cascade: [true]}\n", entry: "removed[0].cascade", problem: "must be true or false (unquoted), got a list"},

		// removed: table.
		{name: "table missing", yaml: "release: a\nremoved:\n  - columns: [x]\n", entry: "removed[0].table", problem: "table is required (line 3)"},
		{name: "table missing with schema", yaml: "release: a\nremoved:\n  - schema: nova\n", entry: "removed[0].table", problem: "table is required"},
		{name: "table with two dots", yaml: "release: a\nremoved:\n  - table: a.b.c\n", entry: "removed[0].table", problem: `table "a.b.c" has more than one dot; give the schema with schema: and the table name alone with table:`},
		{name: "table with empty schema part", yaml: "release: a\nremoved:\n  - table: .t\n", entry: "removed[0].table", problem: `schema part "" of ".t": identifier is empty`},
		{name: "table with empty table part", yaml: "release: a\nremoved:\n  - table: nova.\n", entry: "removed[0].table", problem: `table part "" of "nova.": identifier is empty`},
		{name: "table with space after the dot", yaml: "release: a\nremoved:\n  - table: nova. t\n", entry: "removed[0].table", problem: `table part " t" of "nova. t": identifier has leading or trailing spaces`},
		{name: "table with a double quote", yaml: "release: a\nremoved:\n  - table: 'a\"b'\n", entry: "removed[0].table", problem: `table "a\"b": identifier contains a double quote`},
		{name: "table with trailing space", yaml: "release: a\nremoved:\n  - table: \"t \"\n", entry: "removed[0].table", problem: "identifier has leading or trailing spaces"},
		{name: "table too long", yaml: "release: a\nremoved:\n  - table: " + strings.Repeat("t", 64) + "\n", entry: "removed[0].table", problem: "identifier is longer than 63 bytes"},
		{name: "table of 63 characters but 64 bytes", yaml: "release: a\nremoved:\n  - table: é" + strings.Repeat("t", 62) + "\n", entry: "removed[0].table", problem: "identifier is longer than 63 bytes"},
		{name: "table with a NUL", yaml: "release: a\nremoved:\n  - table: \"t\\0u\"\n", entry: "removed[0].table", problem: `table "t\x00u": identifier contains a control character`},
		{name: "table with a newline", yaml: "release: a\nremoved:\n  - table: \"t\\nu\"\n", entry: "removed[0].table", problem: `table "t\nu": identifier contains a control character`},
		{name: "table with a C1 control character", yaml: "release: a\nremoved:\n  - table: \"t\\x85u\"\n", entry: "removed[0].table", problem: `table "t\u0085u": identifier contains a control character`},
		{name: "invalid UTF-8 in the file", yaml: "release: a\nremoved:\n  - table: t\xffu\n", problem: "invalid YAML: "},

		// removed: schema.
		{name: "schema with a double quote", yaml: "release: a\nremoved:\n  - {schema: 'n\"', table: t}\n", entry: "removed[0].schema", problem: `schema "n\"": identifier contains a double quote`},
		{name: "schema with a dot", yaml: "release: a\nremoved:\n  - {schema: a.b, table: t}\n", entry: "removed[0].schema", problem: `schema "a.b" contains a dot`},
		{name: "schema given and table invalid", yaml: "release: a\nremoved:\n  - {schema: s, table: \" t\"}\n", entry: "removed[0].table", problem: "identifier has leading or trailing spaces"},

		// removed: columns.
		{name: "column injection", yaml: "release: a\nremoved:\n  - table: t\n    columns: [a, 'x\"; DROP TABLE t; --']\n", entry: "removed[0].columns[1]", problem: "identifier contains a double quote (line 4)"},
		{name: "column empty", yaml: "release: a\nremoved:\n  - table: t\n    columns:\n      - \"\"\n", entry: "removed[0].columns[0]", problem: `column "": identifier is empty (line 5)`},
		{name: "column null", yaml: "release: a\nremoved:\n  - table: t\n    columns: [~]\n", entry: "removed[0].columns[0]", problem: "identifier is empty"},
		{name: "column with a tab", yaml: "release: a\nremoved:\n  - table: t\n    columns: [\"a\\tb\"]\n", entry: "removed[0].columns[0]", problem: "identifier contains a control character"},
		{name: "column too long", yaml: "release: a\nremoved:\n  - table: t\n    columns: [" + strings.Repeat("c", 64) + "]\n", entry: "removed[0].columns[0]", problem: "identifier is longer than 63 bytes"},
		{name: "column listed twice", yaml: "release: a\nremoved:\n  - table: t\n  - table: u\n    columns: [a, b, a]\n", entry: "removed[1].columns[2]", problem: `column "a" is listed twice (also columns[0]) (line 5)`},

		// removed: the same table twice.
		{name: "whole table twice", yaml: "release: a\nremoved:\n  - table: t\n  - table: t\n", entry: "removed[1].table", problem: `table "t" is already dropped whole by removed[0] (line 4)`},
		{name: "whole table then its columns", yaml: "release: a\nremoved:\n  - table: t\n  - {table: t, columns: [c]}\n", entry: "removed[1].table", problem: `table "t" is already dropped whole by removed[0]`},
		{name: "columns then the whole table", yaml: "release: a\nremoved:\n  - {table: t, columns: [c]}\n  - table: t\n", entry: "removed[1].table", problem: `drops table "t" whole, but removed[0] removes columns of it`},
		{name: "columns of one table in two entries", yaml: "release: a\nremoved:\n  - {table: t, columns: [c]}\n  - {table: t, columns: [d]}\n", entry: "removed[1].table", problem: `table "t" is already listed at removed[0]; list all its columns there`},
		{name: "same table spelled two ways", yaml: "release: a\nremoved:\n  - table: nova.t\n  - {schema: nova, table: t}\n", entry: "removed[1].table", problem: `table "nova.t" is already dropped whole by removed[0]`},

		// Aliases cannot be used to blow up.
		{name: "alias cycle", yaml: "release: a\nremoved: &x [*x]\n", entry: "removed[0]", problem: "must be a mapping with table and, optionally, schema, columns and cascade, got a list"},
		{name: "alias bomb", yaml: aliasBomb(400), entry: "removed[124].columns[85]", problem: "manifest too large: more than 100000 YAML nodes once aliases are expanded"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, err := ParseManifest("m.yaml", []byte(tt.yaml))
			require.Error(t, err)
			require.Nil(t, m)
			var me *ManifestError
			require.True(t, errors.As(err, &me), "%T is not a *ManifestError", err)
			require.Equal(t, "m.yaml", me.File)
			require.Equal(t, tt.entry, me.Entry)
			msg := err.Error()
			require.NotContains(t, msg, "\n")
			prefix := "m.yaml: "
			if tt.entry != "" {
				prefix += tt.entry + ": "
			}
			require.True(t, strings.HasPrefix(msg, prefix), "%q does not start with %q", msg, prefix)
			require.Contains(t, msg, tt.problem)
		})
	}
}

// aliasBomb is a small manifest whose aliases expand to n*n nodes.
func aliasBomb(n int) string {
	var b strings.Builder
	b.WriteString("release: a\n")
	b.WriteString("removed:\n  - &r\n    table: t\n    columns: &cols\n")
	b.WriteString("      - &c c\n")
	for range n - 1 {
		b.WriteString("      - *c\n")
	}
	for range n - 1 {
		b.WriteString("  - *r\n")
	}
	return b.String()
}

// TestManifestValidate covers what only a hand-built manifest can hold.
func TestManifestValidate(t *testing.T) {
	tests := []struct {
		name  string
		m     Manifest
		entry string // empty: valid
	}{
		{name: "valid", m: Manifest{Release: "R", Removed: []Removal{{Table: "nova.t", Columns: []string{"c"}}}}},
		{name: "normalized", m: Manifest{Release: "R", Removed: []Removal{{Schema: "nova", Table: "t"}}}},
		{name: "column with a NUL", m: Manifest{Release: "R", Removed: []Removal{{Table: "t", Columns: []string{"a\x00b"}}}}, entry: "removed[0].columns[0]"},
		{name: "table with a DEL", m: Manifest{Release: "R", Removed: []Removal{{Table: "t\x7f"}}}, entry: "removed[0].table"},
		{name: "schema with C1 control", m: Manifest{Release: "R", Removed: []Removal{{Schema: "s\u0085", Table: "t"}}}, entry: "removed[0].schema"},
		{name: "column with invalid UTF-8", m: Manifest{Release: "R", Removed: []Removal{{Table: "t", Columns: []string{"a\xffb"}}}}, entry: "removed[0].columns[0]"},
		{name: "release with newline", m: Manifest{Release: "a\nb"}, entry: "release"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.m.Validate("f.yaml")
			if tt.entry == "" {
				require.NoError(t, err)
				return
			}
			var me *ManifestError
			require.ErrorAs(t, err, &me)
			require.Equal(t, tt.entry, me.Entry)
			require.NotContains(t, err.Error(), "\n")
		})
	}
}

func TestManifestErrorIsOneLine(t *testing.T) {
	tests := []struct {
		err  ManifestError
		want string
	}{
		{ManifestError{File: "m.yaml", Entry: "release", Problem: "required"}, "m.yaml: release: required"},
		{ManifestError{File: "m.yaml", Problem: "manifest is empty"}, "m.yaml: manifest is empty"},
		{ManifestError{File: "m.yaml", Problem: "invalid YAML: unmarshal errors:\n  line 1: a\n  line 2: b"}, "m.yaml: invalid YAML: unmarshal errors:; line 1: a; line 2: b"},
	}
	for _, tt := range tests {
		require.Equal(t, tt.want, tt.err.Error())
	}
}

func TestManifestRemovalDDL(t *testing.T) {
	tests := []struct {
		name   string
		yaml   string // one removal, indented as a list item under removed:
		key    string
		quoted string
		ddl    string
	}{
		{
			name:   "plain columns",
			yaml:   "table: instances\n    columns: [name, display_name]",
			key:    "instances",
			quoted: `"instances"`,
			ddl:    `ALTER TABLE "instances" DROP COLUMN IF EXISTS "name", DROP COLUMN IF EXISTS "display_name"`,
		},
		{
			name:   "mixed case",
			yaml:   "table: Instances\n    columns: [\"Name\"]",
			key:    "Instances",
			quoted: `"Instances"`,
			ddl:    `ALTER TABLE "Instances" DROP COLUMN IF EXISTS "Name"`,
		},
		{
			name:   "spaces",
			yaml:   "table: \"my instances\"\n    columns: [display name]",
			key:    "my instances",
			quoted: `"my instances"`,
			ddl:    `ALTER TABLE "my instances" DROP COLUMN IF EXISTS "display name"`,
		},
		{
			name:   "schema-qualified",
			yaml:   "table: nova.instances\n    columns: [name]",
			key:    "nova.instances",
			quoted: `"nova"."instances"`,
			ddl:    `ALTER TABLE "nova"."instances" DROP COLUMN IF EXISTS "name"`,
		},
		{
			name:   "schema on its own",
			yaml:   "schema: Nova\n    table: instances",
			key:    "Nova.instances",
			quoted: `"Nova"."instances"`,
			ddl:    `DROP TABLE IF EXISTS "Nova"."instances"`,
		},
		{
			name:   "dot inside a table name",
			yaml:   "schema: nova\n    table: a.b",
			key:    "nova.a.b",
			quoted: `"nova"."a.b"`,
			ddl:    `DROP TABLE IF EXISTS "nova"."a.b"`,
		},
		{
			name:   "whole table",
			yaml:   "table: legacy_flavors",
			key:    "legacy_flavors",
			quoted: `"legacy_flavors"`,
			ddl:    `DROP TABLE IF EXISTS "legacy_flavors"`,
		},
		{
			name:   "whole table cascade",
			yaml:   "table: nova.legacy_flavors\n    cascade: true",
			key:    "nova.legacy_flavors",
			quoted: `"nova"."legacy_flavors"`,
			ddl:    `DROP TABLE IF EXISTS "nova"."legacy_flavors" CASCADE`,
		},
		{
			name:   "columns cascade",
			yaml:   "table: t\n    columns: [a, \"B\"]\n    cascade: true",
			key:    "t",
			quoted: `"t"`,
			ddl:    `ALTER TABLE "t" DROP COLUMN IF EXISTS "a" CASCADE, DROP COLUMN IF EXISTS "B" CASCADE`,
		},
		{
			name:   "non-ASCII and an apostrophe",
			yaml:   "table: café\n    columns: [\"it's\"]",
			key:    "café",
			quoted: `"café"`,
			ddl:    `ALTER TABLE "café" DROP COLUMN IF EXISTS "it's"`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, err := ParseManifest("m.yaml", []byte("release: R\nremoved:\n  - "+tt.yaml+"\n"))
			require.NoError(t, err)
			require.Len(t, m.Removed, 1)
			r := m.Removed[0]
			require.Equal(t, tt.key, r.Key())
			require.Equal(t, tt.quoted, r.QuotedTable())
			require.Equal(t, tt.ddl, r.DDL())
			require.Equal(t, []string{tt.ddl}, m.DDL())

			// Round trip: the identifiers read back out of the DDL are the
			// ones in the manifest.
			schema, table, cols, cascade, err := parseDDL(r.DDL())
			require.NoError(t, err)
			require.Equal(t, r.Schema, schema)
			require.Equal(t, r.Table, table)
			require.Equal(t, r.Columns, cols)
			require.Equal(t, r.Cascade, cascade)
		})
	}
}

// An unnormalized, hand-built removal names the same table as its parsed
// form.
func TestManifestRemovalUnnormalized(t *testing.T) {
	r := Removal{Table: "nova.instances", Columns: []string{"Name"}}
	require.Equal(t, "nova.instances", r.Key())
	require.Equal(t, `"nova"."instances"`, r.QuotedTable())
	require.Equal(t, `ALTER TABLE "nova"."instances" DROP COLUMN IF EXISTS "Name"`, r.DDL())
}

func TestManifestDDLEmpty(t *testing.T) {
	m, err := ParseManifest("m.yaml", []byte("release: R\n"))
	require.NoError(t, err)
	require.Empty(t, m.DDL())
}

func TestManifestDigest(t *testing.T) {
	const base = "release: L\ndescription: d\nexpand: [SELECT 1]\npreconditions:\n  - {name: n, sql: SELECT 1}\nremoved:\n  - table: nova.instances\n    columns: [name]\n"
	parse := func(s string) *Manifest {
		t.Helper()
		m, err := ParseManifest("m.yaml", []byte(s))
		require.NoError(t, err)
		return m
	}
	d := parse(base).Digest()
	require.Len(t, d, 64)
	require.Regexp(t, "^[0-9a-f]{64}$", d)

	t.Run("stable", func(t *testing.T) {
		for range 5 {
			require.Equal(t, d, parse(base).Digest())
		}
		m := parse(base)
		require.Equal(t, m.Digest(), m.Digest())
	})

	t.Run("same content, different spelling", func(t *testing.T) {
		for _, s := range []string{
			"# a comment\n" + base,
			strings.ReplaceAll(base, "table: nova.instances", "schema: nova\n    table: instances"),
			"release: L\ndescription: d\nexpand: [SELECT 1]\npreconditions:\n  - {name: n, sql: SELECT 1}\nremoved:\n  - {table: nova.instances, columns: [name], cascade: false}\n",
			"removed:\n  - table: nova.instances\n    columns: [name]\nrelease: L\ndescription: d\nexpand: [SELECT 1]\npreconditions:\n  - {name: n, sql: SELECT 1}\n",
		} {
			require.Equal(t, d, parse(s).Digest(), s)
		}
		// A hand-built, unnormalized manifest digests like its parsed form.
		hand := &Manifest{
			Release: "L", Description: "d", Expand: []string{"SELECT 1"},
			Preconditions: []Precondition{{Name: "n", SQL: "SELECT 1"}},
			Removed:       []Removal{{Table: "nova.instances", Columns: []string{"name"}}},
		}
		require.Equal(t, d, hand.Digest())
		require.Equal(t, "nova.instances", hand.Removed[0].Table, "Digest must not change the manifest")
	})

	t.Run("changes with content", func(t *testing.T) {
		seen := map[string]string{d: base}
		for _, s := range []string{
			strings.Replace(base, "release: L", "release: M", 1),
			strings.Replace(base, "description: d", "description: e", 1),
			strings.Replace(base, "description: d\n", "", 1),
			strings.Replace(base, "[SELECT 1]", "[SELECT 2]", 1),
			strings.Replace(base, "[SELECT 1]", "[SELECT 1, SELECT 2]", 1),
			strings.Replace(base, "{name: n,", "{name: m,", 1),
			strings.Replace(base, "sql: SELECT 1}", "sql: SELECT 2}", 1),
			strings.Replace(base, "nova.instances", "instances", 1),
			strings.Replace(base, "nova.instances", "nova.Instances", 1),
			strings.Replace(base, "[name]", "[name, other]", 1),
			strings.Replace(base, "    columns: [name]\n", "", 1),
			base + "    cascade: true\n",
			base + "  - table: other\n",
		} {
			got := parse(s).Digest()
			prev, dup := seen[got]
			require.False(t, dup, "%q and %q share a digest", s, prev)
			seen[got] = s
		}
	})
}

// parseDDL reads back a statement made by Removal.DDL, accepting nothing
// but the fixed keywords outside quoted identifiers. It is the check that
// every identifier in generated DDL is quoted.
func parseDDL(ddl string) (schema, table string, columns []string, cascade bool, err error) {
	s := ddl
	bad := func(what string) error { return errors.New("DDL " + what + ": " + ddl) }
	ident := func() (string, error) {
		if !strings.HasPrefix(s, `"`) {
			return "", bad("has an unquoted identifier at " + s)
		}
		var b strings.Builder
		for i := 1; i < len(s); i++ {
			if s[i] != '"' {
				b.WriteByte(s[i])
				continue
			}
			if i+1 < len(s) && s[i+1] == '"' {
				b.WriteByte('"')
				i++
				continue
			}
			s = s[i+1:]
			return b.String(), nil
		}
		return "", bad("has an unterminated identifier")
	}
	eat := func(kw string) bool {
		if strings.HasPrefix(s, kw) {
			s = s[len(kw):]
			return true
		}
		return false
	}
	qualified := func() error {
		a, err := ident()
		if err != nil {
			return err
		}
		if !eat(".") {
			table = a
			return nil
		}
		schema = a
		table, err = ident()
		return err
	}
	switch {
	case eat("DROP TABLE IF EXISTS "):
		if err := qualified(); err != nil {
			return "", "", nil, false, err
		}
		cascade = eat(" CASCADE")
	case eat("ALTER TABLE "):
		if err := qualified(); err != nil {
			return "", "", nil, false, err
		}
		for first := true; first || eat(","); first = false {
			if !eat(" DROP COLUMN IF EXISTS ") {
				return "", "", nil, false, bad("lacks DROP COLUMN")
			}
			c, err := ident()
			if err != nil {
				return "", "", nil, false, err
			}
			columns = append(columns, c)
			c1 := eat(" CASCADE")
			if !first && c1 != cascade {
				return "", "", nil, false, bad("has CASCADE on some columns only")
			}
			cascade = c1
		}
	default:
		return "", "", nil, false, bad("starts with an unknown statement")
	}
	if s != "" {
		return "", "", nil, false, bad("has trailing text " + s)
	}
	return schema, table, columns, cascade, nil
}
