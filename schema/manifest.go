package schema

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"

	"github.com/lib/pq"
	"go.yaml.in/yaml/v3"
)

// Manifest is one release manifest.
type Manifest struct {
	Release       string         `yaml:"release" json:"release"`
	Description   string         `yaml:"description" json:"description,omitempty"`
	Expand        []string       `yaml:"expand" json:"expand,omitempty"`
	Preconditions []Precondition `yaml:"preconditions" json:"preconditions,omitempty"`
	Removed       []Removal      `yaml:"removed" json:"removed,omitempty"`
}

// Precondition is a query that must return no rows before the release may
// flip to contract.
type Precondition struct {
	Name string `yaml:"name" json:"name"`
	SQL  string `yaml:"sql" json:"sql"`
}

// Removal is one removed() directive. Table may be schema-qualified as
// "nova.instances"; Schema may instead be given on its own. No columns means
// the whole table goes.
type Removal struct {
	Schema  string   `yaml:"schema" json:"schema,omitempty"`
	Table   string   `yaml:"table" json:"table"`
	Columns []string `yaml:"columns" json:"columns,omitempty"`
	Cascade bool     `yaml:"cascade" json:"cascade,omitempty"`
}

// ManifestError names the file, the entry and the problem.
type ManifestError struct{ File, Entry, Problem string }

// Error returns "FILE: ENTRY: PROBLEM" on one line, leaving out empty parts.
func (e *ManifestError) Error() string {
	parts := make([]string, 0, 3)
	for _, p := range []string{e.File, e.Entry, e.Problem} {
		if p != "" {
			parts = append(parts, p)
		}
	}
	return oneLine(strings.Join(parts, ": "))
}

// oneLine folds line breaks so that an error stays one log line whatever a
// file name or a YAML library message holds.
func oneLine(s string) string {
	if !strings.ContainsAny(s, "\r\n") {
		return s
	}
	lines := strings.FieldsFunc(s, func(r rune) bool { return r == '\n' || r == '\r' })
	for i := range lines {
		lines[i] = strings.TrimSpace(lines[i])
	}
	return strings.Join(lines, "; ")
}

// maxYAMLNodes bounds the nodes visited while reading a manifest, counting
// every expansion of an alias, so that an alias bomb or an alias cycle fails
// fast instead of hanging the CLI.
const maxYAMLNodes = 100_000

// Release names are stored, logged and sent in every state message, so they
// are kept short and free of anything that needs quoting.
const maxReleaseName = 63

// LoadManifest reads and parses the manifest at path.
func LoadManifest(path string) (*Manifest, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading manifest: %w", err) // *PathError names the path
	}
	return ParseManifest(path, data)
}

// ParseManifest parses, validates and normalizes one manifest. file names
// the manifest in errors. Parsing is strict: unknown keys, wrong types,
// duplicate keys, an empty file and more than one YAML document are all
// refused. Every error is a *ManifestError.
//
// The YAML is walked as a node tree rather than decoded into the struct so
// that every error can name the entry (removed[1].columns[0]) and its line,
// which the YAML library's own type errors do not.
func ParseManifest(file string, data []byte) (*Manifest, error) {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, &ManifestError{File: file, Problem: "manifest is empty"}
		}
		return nil, &ManifestError{File: file, Problem: yamlProblem(err)}
	}
	var next yaml.Node
	switch err := dec.Decode(&next); {
	case errors.Is(err, io.EOF):
	case err != nil:
		return nil, &ManifestError{File: file, Problem: yamlProblem(err)}
	default:
		return nil, &ManifestError{File: file, Problem: fmt.Sprintf(
			"more than one YAML document (a second starts at line %d); put one release in each file", next.Line)}
	}

	r := &reader{file: file, budget: maxYAMLNodes, lines: map[string]int{}}
	m, err := r.manifest(&doc)
	if err != nil {
		return nil, err
	}
	if err := m.Validate(file); err != nil {
		var me *ManifestError
		if errors.As(err, &me) {
			if line := r.line(me.Entry); line > 0 {
				me.Problem += fmt.Sprintf(" (line %d)", line)
			}
		}
		return nil, err
	}
	n := m.normalized()
	return &n, nil
}

func yamlProblem(err error) string {
	return "invalid YAML: " + strings.TrimPrefix(oneLine(err.Error()), "yaml: ")
}

// reader turns a YAML node tree into a Manifest, checking shape and types.
type reader struct {
	file   string
	budget int
	lines  map[string]int // entry → line, to point Validate's errors at the file
}

func (r *reader) fail(n *yaml.Node, entry, format string, args ...any) error {
	p := fmt.Sprintf(format, args...)
	if n != nil && n.Line > 0 {
		p += fmt.Sprintf(" (line %d)", n.Line)
	}
	return &ManifestError{File: r.file, Entry: entry, Problem: p}
}

// line returns the line of entry, or of its nearest parent the file names.
func (r *reader) line(entry string) int {
	for entry != "" {
		if l, ok := r.lines[entry]; ok {
			return l
		}
		i := strings.LastIndexAny(entry, ".[")
		if i < 0 {
			return 0
		}
		entry = entry[:i]
	}
	return 0
}

// resolve follows aliases and charges the visit to the budget.
func (r *reader) resolve(n *yaml.Node, entry string) (*yaml.Node, error) {
	for {
		r.budget--
		if r.budget < 0 {
			return nil, r.fail(nil, entry, "manifest too large: more than %d YAML nodes once aliases are expanded", maxYAMLNodes)
		}
		if n.Kind != yaml.AliasNode {
			break
		}
		if n.Alias == nil {
			return nil, r.fail(n, entry, "alias %q has no anchor", n.Value)
		}
		n = n.Alias
	}
	if _, ok := r.lines[entry]; !ok && n.Line > 0 {
		r.lines[entry] = n.Line
	}
	return n, nil
}

func isNull(n *yaml.Node) bool {
	return n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null"
}

func describe(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.ScalarNode:
		switch n.ShortTag() {
		case "!!str":
			return fmt.Sprintf("the string %q", n.Value)
		case "!!null":
			return "null"
		}
		return fmt.Sprintf("%q (%s)", n.Value, strings.TrimPrefix(n.ShortTag(), "!!"))
	}
	return "a document"
}

// field is one key of a mapping, its value already resolved.
type field struct {
	key   string
	value *yaml.Node
	entry string
}

// mapping checks n is a mapping whose keys are all known and each given
// once, and returns its fields in order.
func (r *reader) mapping(n *yaml.Node, entry, what string, known []string) ([]field, error) {
	if n.Kind != yaml.MappingNode {
		return nil, r.fail(n, entry, "must be %s, got %s", what, describe(n))
	}
	seen := map[string]int{}
	var out []field
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, err := r.resolve(n.Content[i], entry)
		if err != nil {
			return nil, err
		}
		if k.Kind != yaml.ScalarNode {
			return nil, r.fail(k, entry, "keys must be plain names, got %s", describe(k))
		}
		if k.ShortTag() == "!!merge" {
			return nil, r.fail(k, entry, "merge keys (<<) are not supported; write the keys out")
		}
		if !slices.Contains(known, k.Value) {
			return nil, r.fail(k, entry, "unknown key %q (known keys: %s)", k.Value, strings.Join(known, ", "))
		}
		if line, dup := seen[k.Value]; dup {
			return nil, r.fail(k, entry, "key %q given twice (first at line %d)", k.Value, line)
		}
		seen[k.Value] = k.Line
		child := k.Value
		if entry != "" {
			child = entry + "." + k.Value
		}
		v, err := r.resolve(n.Content[i+1], child)
		if err != nil {
			return nil, err
		}
		out = append(out, field{key: k.Value, value: v, entry: child})
	}
	return out, nil
}

// str reads a string. Any scalar is taken as written, so "release: 2024.1"
// and "release: 007" keep their spelling; null reads as "".
func (r *reader) str(n *yaml.Node, entry string) (string, error) {
	if n.Kind != yaml.ScalarNode {
		return "", r.fail(n, entry, "must be a string, got %s", describe(n))
	}
	switch n.ShortTag() {
	case "!!null":
		return "", nil
	case "!!str", "!!int", "!!float", "!!bool", "!!timestamp":
		return n.Value, nil
	}
	return "", r.fail(n, entry, "must be a string, got %s", describe(n))
}

// boolean accepts only an unquoted true or false: cascade decides whether
// dependent objects are dropped, so "yes", "1" or "true" in quotes are
// refused rather than guessed at. null (or no value) reads as false.
func (r *reader) boolean(n *yaml.Node, entry string) (bool, error) {
	if n.Kind == yaml.ScalarNode {
		switch {
		case isNull(n):
			return false, nil
		case n.ShortTag() == "!!bool":
			if b, err := strconv.ParseBool(strings.ToLower(n.Value)); err == nil {
				return b, nil
			}
		}
	}
	return false, r.fail(n, entry, "must be true or false (unquoted), got %s", describe(n))
}

// list checks n is a list (null reads as empty) and calls each on every
// item, resolved.
func (r *reader) list(n *yaml.Node, entry, what string, each func(i int, item *yaml.Node, entry string) error) error {
	if isNull(n) {
		return nil
	}
	if n.Kind != yaml.SequenceNode {
		return r.fail(n, entry, "must be a list of %s, got %s", what, describe(n))
	}
	for i, item := range n.Content {
		e := fmt.Sprintf("%s[%d]", entry, i)
		item, err := r.resolve(item, e)
		if err != nil {
			return err
		}
		if err := each(i, item, e); err != nil {
			return err
		}
	}
	return nil
}

func (r *reader) strList(n *yaml.Node, entry, what string) ([]string, error) {
	var out []string
	err := r.list(n, entry, what, func(_ int, item *yaml.Node, e string) error {
		s, err := r.str(item, e)
		out = append(out, s)
		return err
	})
	return out, err
}

func (r *reader) manifest(doc *yaml.Node) (Manifest, error) {
	var m Manifest
	root, err := r.resolve(doc, "")
	if err != nil {
		return m, err
	}
	if root.Kind == yaml.DocumentNode {
		if len(root.Content) == 0 {
			return m, r.fail(nil, "", "manifest is empty")
		}
		if root, err = r.resolve(root.Content[0], ""); err != nil {
			return m, err
		}
	}
	if isNull(root) {
		return m, r.fail(nil, "", "manifest is empty")
	}
	fields, err := r.mapping(root, "", "a mapping with release, description, expand, preconditions and removed",
		[]string{"release", "description", "expand", "preconditions", "removed"})
	if err != nil {
		return m, err
	}
	for _, f := range fields {
		switch f.key {
		case "release":
			m.Release, err = r.str(f.value, f.entry)
		case "description":
			m.Description, err = r.str(f.value, f.entry)
		case "expand":
			m.Expand, err = r.strList(f.value, f.entry, "SQL statements")
		case "preconditions":
			err = r.list(f.value, f.entry, "preconditions (name and sql)", func(_ int, item *yaml.Node, e string) error {
				p, err := r.precondition(item, e)
				m.Preconditions = append(m.Preconditions, p)
				return err
			})
		case "removed":
			err = r.list(f.value, f.entry, "removals (table, columns)", func(_ int, item *yaml.Node, e string) error {
				rm, err := r.removal(item, e)
				m.Removed = append(m.Removed, rm)
				return err
			})
		}
		if err != nil {
			return m, err
		}
	}
	return m, nil
}

func (r *reader) precondition(n *yaml.Node, entry string) (Precondition, error) {
	var p Precondition
	fields, err := r.mapping(n, entry, "a mapping with name and sql", []string{"name", "sql"})
	for _, f := range fields {
		switch f.key {
		case "name":
			p.Name, err = r.str(f.value, f.entry)
		case "sql":
			p.SQL, err = r.str(f.value, f.entry)
		}
		if err != nil {
			break
		}
	}
	return p, err
}

func (r *reader) removal(n *yaml.Node, entry string) (Removal, error) {
	var rm Removal
	fields, err := r.mapping(n, entry, "a mapping with table and, optionally, schema, columns and cascade",
		[]string{"schema", "table", "columns", "cascade"})
	for _, f := range fields {
		switch f.key {
		case "schema":
			rm.Schema, err = r.str(f.value, f.entry)
		case "table":
			rm.Table, err = r.str(f.value, f.entry)
		case "columns":
			rm.Columns, err = r.strList(f.value, f.entry, "column names")
		case "cascade":
			rm.Cascade, err = r.boolean(f.value, f.entry)
		}
		if err != nil {
			break
		}
	}
	return rm, err
}

// Validate checks m and returns the first problem as a *ManifestError that
// names file and the entry. It accepts m both as parsed and as normalized.
func (m *Manifest) Validate(file string) error {
	fail := func(entry, format string, args ...any) error {
		return &ManifestError{File: file, Entry: entry, Problem: fmt.Sprintf(format, args...)}
	}
	if p := releaseNameProblem(m.Release); p != "" {
		return fail("release", "%s", p)
	}
	for i, stmt := range m.Expand {
		if strings.TrimSpace(stmt) == "" {
			return fail(fmt.Sprintf("expand[%d]", i), "statement is empty")
		}
	}
	names := map[string]int{}
	for i, p := range m.Preconditions {
		entry := fmt.Sprintf("preconditions[%d]", i)
		name := strings.TrimSpace(p.Name)
		if name == "" {
			return fail(entry+".name", "name is required")
		}
		if strings.TrimSpace(p.SQL) == "" {
			return fail(entry+".sql", "sql is required")
		}
		if j, dup := names[name]; dup {
			return fail(entry+".name", "precondition %q is already defined at preconditions[%d]", name, j)
		}
		names[name] = i
	}
	tables := map[[2]string]int{}
	for i, r := range m.Removed {
		entry := fmt.Sprintf("removed[%d]", i)
		if err := r.validate(file, entry); err != nil {
			return err
		}
		key := [2]string{}
		key[0], key[1] = r.parts()
		if j, dup := tables[key]; dup {
			prev := m.Removed[j]
			switch {
			case len(prev.Columns) == 0:
				return fail(entry+".table", "table %q is already dropped whole by removed[%d]", r.Key(), j)
			case len(r.Columns) == 0:
				return fail(entry+".table", "drops table %q whole, but removed[%d] removes columns of it; keep one of the two", r.Key(), j)
			default:
				return fail(entry+".table", "table %q is already listed at removed[%d]; list all its columns there", r.Key(), j)
			}
		}
		tables[key] = i
	}
	return nil
}

func releaseNameProblem(name string) string {
	if name == "" {
		return "release name is required"
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		alnum := 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9'
		switch {
		case i == 0 && !alnum:
			return fmt.Sprintf("release name %q must start with a letter or digit", name)
		case !alnum && c != '.' && c != '_' && c != '-':
			return fmt.Sprintf("release name %q may hold only letters, digits, '.', '_' and '-'", name)
		}
	}
	if len(name) > maxReleaseName {
		return fmt.Sprintf("release name is %d characters; the limit is %d", len(name), maxReleaseName)
	}
	return ""
}

// validate checks one removal; entry is "removed[i]".
func (r Removal) validate(file, entry string) error {
	fail := func(entry, format string, args ...any) error {
		return &ManifestError{File: file, Entry: entry, Problem: fmt.Sprintf(format, args...)}
	}
	switch {
	case r.Table == "":
		return fail(entry+".table", "table is required")
	case r.Schema != "":
		if err := ValidateIdentifier(r.Schema); err != nil {
			return fail(entry+".schema", "schema %q: %v", r.Schema, err)
		}
		// Key() is schema.table and is split at the first dot, so a dot in
		// the schema would make it ambiguous. A dot in the table is fine.
		if strings.Contains(r.Schema, ".") {
			return fail(entry+".schema", "schema %q contains a dot, which phasecast cannot tell from the schema.table separator", r.Schema)
		}
		if err := ValidateIdentifier(r.Table); err != nil {
			return fail(entry+".table", "table %q: %v", r.Table, err)
		}
	case strings.Count(r.Table, ".") > 1:
		return fail(entry+".table", "table %q has more than one dot; give the schema with schema: and the table name alone with table:", r.Table)
	case strings.Count(r.Table, ".") == 1:
		schema, table := r.parts()
		if err := ValidateIdentifier(schema); err != nil {
			return fail(entry+".table", "schema part %q of %q: %v", schema, r.Table, err)
		}
		if err := ValidateIdentifier(table); err != nil {
			return fail(entry+".table", "table part %q of %q: %v", table, r.Table, err)
		}
	default:
		if err := ValidateIdentifier(r.Table); err != nil {
			return fail(entry+".table", "table %q: %v", r.Table, err)
		}
	}
	seen := make(map[string]int, len(r.Columns))
	for j, c := range r.Columns {
		ce := fmt.Sprintf("%s.columns[%d]", entry, j)
		if err := ValidateIdentifier(c); err != nil {
			return fail(ce, "column %q: %v", c, err)
		}
		if k, dup := seen[c]; dup {
			return fail(ce, "column %q is listed twice (also columns[%d])", c, k)
		}
		seen[c] = j
	}
	return nil
}

// parts returns the schema ("" when unqualified) and the table, splitting
// "nova.instances" when no schema is given on its own.
func (r Removal) parts() (schema, table string) {
	if r.Schema == "" && strings.Count(r.Table, ".") == 1 {
		schema, table, _ = strings.Cut(r.Table, ".")
		return schema, table
	}
	return r.Schema, r.Table
}

// Key names the table as agents and services do: "instances" or
// "nova.instances", unquoted. A schema never holds a dot, so the first dot
// of a key always ends the schema.
func (r Removal) Key() string {
	schema, table := r.parts()
	if schema == "" {
		return table
	}
	return schema + "." + table
}

// QuotedTable returns the table for SQL, each part quoted:
// "nova"."instances" or "instances".
func (r Removal) QuotedTable() string { return QuoteTable(r.Key()) }

// QuoteTable quotes a table named as in a manifest key, "instances" or
// "nova.instances": the first dot ends the schema.
func QuoteTable(key string) string {
	schema, table, qualified := strings.Cut(key, ".")
	if !qualified {
		return pq.QuoteIdentifier(key)
	}
	return quoteQualified(schema, table)
}

// quoteQualified quotes schema.name, each part on its own.
func quoteQualified(schema, name string) string {
	return pq.QuoteIdentifier(schema) + "." + pq.QuoteIdentifier(name)
}

// DDL returns the statement that carries out the removal. IF EXISTS makes a
// retried contract harmless.
func (r Removal) DDL() string {
	cascade := ""
	if r.Cascade {
		cascade = " CASCADE"
	}
	if len(r.Columns) == 0 {
		return "DROP TABLE IF EXISTS " + r.QuotedTable() + cascade
	}
	drops := make([]string, len(r.Columns))
	for i, c := range r.Columns {
		drops[i] = "DROP COLUMN IF EXISTS " + pq.QuoteIdentifier(c) + cascade
	}
	return "ALTER TABLE " + r.QuotedTable() + " " + strings.Join(drops, ", ")
}

// DDL returns one statement per removal, in manifest order.
func (m *Manifest) DDL() []string {
	out := make([]string, 0, len(m.Removed))
	for _, r := range m.Removed {
		out = append(out, r.DDL())
	}
	return out
}

// Digest returns the hex SHA-256 of the canonical JSON of the normalized
// manifest, so "table: nova.instances" and "schema: nova, table: instances"
// digest alike and re-applying an identical manifest is recognised.
func (m *Manifest) Digest() string {
	n := m.normalized()
	b, err := json.Marshal(n)
	if err != nil {
		// Only strings, bools and slices of them: Marshal cannot fail.
		panic("schema: encoding manifest: " + err.Error())
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// normalized returns a copy of m with every removal's schema split out of
// its table.
func (m *Manifest) normalized() Manifest {
	n := *m
	if m.Removed != nil {
		n.Removed = make([]Removal, len(m.Removed))
		for i, r := range m.Removed {
			r.Schema, r.Table = r.parts()
			n.Removed[i] = r
		}
	}
	return n
}
