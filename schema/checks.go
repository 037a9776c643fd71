package schema

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"

	"github.com/phasecast/phasecast/internal/phase"
)

// ErrUnsafe means a contract would break something: a removed column that
// inserts still need, an object that depends on what is removed, or live
// services whose code predates the release.
var ErrUnsafe = errors.New("unsafe contract")

// Problem kinds.
const (
	// ProblemNotNull: a removed column is NOT NULL without a default, so
	// inserts fail the moment services stop naming it.
	ProblemNotNull = "not_null"
	// ProblemDependent: an object depends on a removed column or table and
	// the removal does not say cascade: true.
	ProblemDependent = "dependent_object"
	// ProblemOldCode: a live agent's code was not built for the release.
	ProblemOldCode = "old_code"
)

// Problem is one reason a contract is unsafe.
type Problem struct {
	Kind   string `json:"kind"`
	Table  string `json:"table,omitempty"`  // the removal's table as the manifest names it
	Column string `json:"column,omitempty"` // empty for whole-table removals and old code
	Detail string `json:"detail"`
	// Fix is the statement to add to expand, when there is one.
	Fix string `json:"fix,omitempty"`
	// Object is the dependent object or the agent, e.g. `view "public"."v_names"`.
	Object string `json:"object,omitempty"`
}

// UnsafeError lists every problem found, not just the first.
type UnsafeError struct {
	Release  string
	Problems []Problem
}

// Error returns a summary line that stands alone, then one line per
// problem.
func (e *UnsafeError) Error() string {
	var b strings.Builder
	n := len(e.Problems)
	fmt.Fprintf(&b, "release %q: unsafe contract: %d problem%s", e.Release, n, plural(n))
	if n > 0 {
		fmt.Fprintf(&b, ", first: %s", oneLine(e.Problems[0].Detail))
	}
	for _, p := range e.Problems {
		b.WriteString("\n  - ")
		b.WriteString(oneLine(p.Detail))
		if p.Fix != "" {
			b.WriteString(" (add to expand: ")
			b.WriteString(p.Fix)
			b.WriteString(")")
		}
	}
	return b.String()
}

func (e *UnsafeError) Unwrap() error { return ErrUnsafe }

func plural(n int) string {
	if n == 1 {
		return ""
	}
	return "s"
}

// Dependent is a database object that depends on a removed column or table
// and would be dropped with it (Cascade) or would stop the drop.
type Dependent struct {
	Removal string `json:"removal"`          // Removal.Key()
	Column  string `json:"column,omitempty"` // the removed column it depends on; empty for tables
	// Kind is what the object is: view, materialized view, foreign key,
	// index, check constraint, unique constraint, trigger, policy, rule,
	// generated column, column default, statistics, function, column, ...
	Kind string `json:"kind"`
	// Name is the object's qualified, quoted name, e.g. "public"."v_names"
	// or "fk_x" on "public"."t".
	Name string `json:"name"`
	// Via names the dependent object this one depends on, when it does not
	// depend on the removed column or table directly.
	Via string `json:"via,omitempty"`
	// Auto: PostgreSQL would drop the object along with the column even
	// without CASCADE (an index or constraint that also spans other
	// columns); otherwise the DROP without CASCADE would fail.
	Auto bool `json:"auto,omitempty"`
	// Cascade: the removal says cascade: true, so the object goes with it.
	Cascade bool `json:"cascade,omitempty"`
	// Fix is a statement that removes the dependency, to add to expand.
	Fix string `json:"fix,omitempty"`
}

// Object returns the kind and name together: `view "public"."v_names"`.
func (d Dependent) Object() string { return d.Kind + " " + d.Name }

// Dependents lists, for every removal of m, the objects that depend on it
// other than the removed columns' own parts. For a column that is: views,
// materialized views and rules; foreign keys, including those from other
// tables; indexes, constraints and statistics that also span other columns
// (PostgreSQL drops those silently with the column); partial and
// expression indexes that name the column; column-specific triggers;
// policies; generated columns; and whatever depends on those in turn. An
// index or constraint on the removed columns alone is part of them and goes
// with the DROP, so it is not listed. The column's copies in inheritance
// children and partitions count as the column. For a whole table it is
// every object outside the table and its partitions that depends on it,
// inheritance children included. Tables and columns that do not exist are
// skipped, so re-running after a drop finds nothing.
func (s *Store) Dependents(ctx context.Context, q sqlx.QueryerContext, m *Manifest) ([]Dependent, error) {
	var out []Dependent
	for _, r := range m.Removed {
		deps, _, err := removalDependents(ctx, q, r)
		if err != nil {
			return nil, fmt.Errorf("dependents of %s: %w", r.QuotedTable(), err)
		}
		out = append(out, deps...)
	}
	return out, nil
}

// CheckSafety runs the built-in checks of DESIGN.md on m: every removed
// column must be nullable or have a default, and no object may depend on a
// removed column or table unless its removal says cascade: true. It returns
// the problems found (empty when safe) and every dependent object, those
// that cascade will drop included.
func (s *Store) CheckSafety(ctx context.Context, q sqlx.QueryerContext, m *Manifest) ([]Problem, []Dependent, error) {
	var problems []Problem
	for _, r := range m.Removed {
		p, err := notNullProblems(ctx, q, r)
		if err != nil {
			return nil, nil, fmt.Errorf("checking %s: %w", r.QuotedTable(), err)
		}
		problems = append(problems, p...)
	}
	deps, err := s.Dependents(ctx, q, m)
	if err != nil {
		return nil, nil, err
	}
	for _, d := range deps {
		if !d.Cascade {
			problems = append(problems, dependentProblem(d))
		}
	}
	return problems, deps, nil
}

// ContractCheckOptions tune ContractCheck.
type ContractCheckOptions struct {
	// Force lets the flip through although live agents run code that
	// predates the release. It never overrides the other checks. Defaults
	// to false.
	Force bool
	// Warn, when set, receives each old-code problem that Force let
	// through. Defaults to none.
	Warn func(Problem)
	// Cascaded, when set, receives each dependent object that a removal
	// with cascade: true will drop. Defaults to none.
	Cascaded func(Dependent)
	// Gone, when set, receives each removed table or column that no longer
	// exists: its removal counts as done. Defaults to none.
	Gone func(Gone)
}

// ContractCheck returns a FlipOptions.Check that refuses a flip to contract
// when CheckSafety finds a problem, or when a live agent (lease unexpired
// on the database clock) runs code that does not know the release, unless
// opts.Force. It checks flips out of migrate only, whose one allowed move is
// to contract; every other flip passes untouched (the contract runner runs
// its own checks). The refusal is an *UnsafeError listing every problem.
func (s *Store) ContractCheck(opts ContractCheckOptions) func(ctx context.Context, tx *sqlx.Tx, rel *ReleaseRow) error {
	return func(ctx context.Context, tx *sqlx.Tx, rel *ReleaseRow) error {
		if rel.Phase != phase.Migrate {
			return nil
		}
		m, err := rel.LoadManifest()
		if err != nil {
			return err
		}
		problems, deps, err := s.CheckSafety(ctx, tx, m)
		if err != nil {
			return err
		}
		agents, err := s.agents(ctx, tx, true)
		if err != nil {
			return err
		}
		for _, a := range agents {
			if a.Knows(rel.Name) {
				continue
			}
			p := oldCodeProblem(rel.Name, a)
			if opts.Force {
				if opts.Warn != nil {
					opts.Warn(p)
				}
				continue
			}
			problems = append(problems, p)
		}
		if len(problems) > 0 {
			return &UnsafeError{Release: rel.Name, Problems: problems}
		}
		if opts.Cascaded != nil {
			for _, d := range deps {
				opts.Cascaded(d)
			}
		}
		if opts.Gone != nil {
			gone, err := s.AlreadyGone(ctx, tx, m)
			if err != nil {
				return err
			}
			for _, g := range gone {
				opts.Gone(g)
			}
		}
		return nil
	}
}

// Gone is a removed table or column that no longer exists: an earlier run,
// another release or someone by hand dropped it. Its removal counts as
// done.
type Gone struct {
	Removal string `json:"removal"`          // Removal.Key()
	Column  string `json:"column,omitempty"` // empty when the table itself is gone
	// Name is the table or column, quoted: "app"."instances" or
	// "app"."instances"."name".
	Name string `json:"name"`
}

// Object returns what is gone: `table "app"."instances"` or
// `column "app"."instances"."name"`.
func (g Gone) Object() string {
	if g.Column == "" {
		return "table " + g.Name
	}
	return "column " + g.Name
}

// AlreadyGone lists, for every removal of m, the removed columns and tables
// that no longer exist. A removal whose table is gone is one entry for the
// table, however many columns it names.
func (s *Store) AlreadyGone(ctx context.Context, q sqlx.QueryerContext, m *Manifest) ([]Gone, error) {
	out := []Gone{}
	for _, r := range m.Removed {
		_, gone, err := removalPresence(ctx, q, r)
		if err != nil {
			return nil, fmt.Errorf("checking %s: %w", r.QuotedTable(), err)
		}
		out = append(out, gone...)
	}
	return out, nil
}

// removalPresence splits what a removal names into what still exists (the
// column names, or the quoted table for a whole-table removal) and what is
// gone. A missing schema reads as a missing table.
func removalPresence(ctx context.Context, q sqlx.QueryerContext, r Removal) (present []string, gone []Gone, err error) {
	var exists bool
	if err := sqlx.GetContext(ctx, q, &exists, `SELECT to_regclass($1) IS NOT NULL`, r.QuotedTable()); err != nil {
		return nil, nil, err
	}
	if !exists {
		return nil, []Gone{{Removal: r.Key(), Name: r.QuotedTable()}}, nil
	}
	if len(r.Columns) == 0 {
		return []string{r.QuotedTable()}, nil, nil
	}
	if err := sqlx.SelectContext(ctx, q, &present, `
		SELECT attname FROM pg_attribute
		WHERE attrelid = to_regclass($1) AND attname = ANY ($2) AND attnum > 0 AND NOT attisdropped
		ORDER BY array_position($2, attname::text)`, r.QuotedTable(), pq.StringArray(r.Columns)); err != nil {
		return nil, nil, err
	}
	for _, c := range r.Columns {
		if !slices.Contains(present, c) {
			gone = append(gone, Gone{Removal: r.Key(), Column: c, Name: r.QuotedTable() + "." + pq.QuoteIdentifier(c)})
		}
	}
	return present, gone, nil
}

func oldCodeProblem(release string, a Agent) Problem {
	return Problem{
		Kind: ProblemOldCode,
		Detail: fmt.Sprintf("agent %s (service %s on host %s, pid %d, version %q) runs code that predates release %q: it still names the removed columns",
			a.ID, a.Service, a.Host, a.PID, a.Version, release),
		Object: "agent " + a.ID,
	}
}

func dependentProblem(d Dependent) Problem {
	target := "table " + d.Removal
	if d.Column != "" {
		target = fmt.Sprintf("column %q of %s", d.Column, d.Removal)
	}
	how := "depends on " + target
	if d.Via != "" {
		how = fmt.Sprintf("depends on %s, which depends on %s", d.Via, target)
	}
	effect := "the DROP would fail"
	if d.Auto {
		effect = "PostgreSQL would drop it silently along with the column"
	}
	detail := fmt.Sprintf("%s %s: %s; remove or rewrite it in expand, or set cascade: true on the removal of %s to drop it too",
		d.Object(), how, effect, d.Removal)
	return Problem{Kind: ProblemDependent, Table: d.Removal, Column: d.Column, Detail: detail, Fix: d.Fix, Object: d.Object()}
}

// notNullColumnsQuery reads the removed columns that still exist.
const notNullColumnsQuery = `
SELECT a.attname, a.attnotnull, a.atthasdef, a.attidentity <> '' AS identity, a.attgenerated <> '' AS generated,
       EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = a.attrelid AND i.indisprimary AND a.attnum = ANY (i.indkey)) AS in_primary_key
FROM pg_attribute a
WHERE a.attrelid = to_regclass($1) AND a.attname = ANY ($2) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY array_position($2, a.attname::text)`

func notNullProblems(ctx context.Context, q sqlx.QueryerContext, r Removal) ([]Problem, error) {
	if len(r.Columns) == 0 {
		return nil, nil
	}
	var cols []struct {
		Name         string `db:"attname"`
		NotNull      bool   `db:"attnotnull"`
		HasDefault   bool   `db:"atthasdef"`
		Identity     bool   `db:"identity"`
		Generated    bool   `db:"generated"`
		InPrimaryKey bool   `db:"in_primary_key"`
	}
	if err := sqlx.SelectContext(ctx, q, &cols, notNullColumnsQuery, r.QuotedTable(), pq.StringArray(r.Columns)); err != nil {
		return nil, err
	}
	var out []Problem
	for _, c := range cols {
		// Identity and generated columns fill themselves in.
		if !c.NotNull || c.HasDefault || c.Identity || c.Generated {
			continue
		}
		p := Problem{Kind: ProblemNotNull, Table: r.Key(), Column: c.Name}
		if c.InPrimaryKey {
			p.Detail = fmt.Sprintf("column %q of %s is part of the primary key: give the table a primary key without it in expand, or inserts that stop naming it will fail",
				c.Name, r.Key())
		} else {
			p.Fix = "ALTER TABLE " + r.QuotedTable() + " ALTER COLUMN " + pq.QuoteIdentifier(c.Name) + " DROP NOT NULL"
			p.Detail = fmt.Sprintf("column %q of %s is NOT NULL without a default: inserts that stop naming it will fail once services drop it",
				c.Name, r.Key())
		}
		out = append(out, p)
	}
	return out, nil
}

// depNode is an object in pg_depend's terms.
type depNode struct {
	ClassID  int64 `db:"classid"`
	ObjID    int64 `db:"objid"`
	ObjSubID int32 `db:"objsubid"`
}

// dependentsStep finds the objects that depend on the given ones, through
// normal and automatic dependencies (internal ones tie an object's parts
// together and are not followed). A dependency on a whole object also
// covers its columns. Each found object is normalized to the thing a person
// would name: a view's _RETURN rule becomes the view, a generated column's
// expression becomes the column, a constraint's index becomes the
// constraint.
const dependentsStep = `
SELECT min(f.i) AS parent, n.classid, n.objid, n.objsubid, bool_or(d.deptype = 'a') AS auto
FROM unnest($1::oid[], $2::oid[], $3::int4[]) WITH ORDINALITY AS f(classid, objid, objsubid, i)
JOIN pg_depend d ON d.refclassid = f.classid AND d.refobjid = f.objid
                AND (f.objsubid = 0 OR d.refobjsubid = f.objsubid)
LEFT JOIN pg_rewrite rw ON d.classid = 'pg_rewrite'::regclass AND rw.oid = d.objid AND rw.rulename = '_RETURN'
LEFT JOIN pg_attrdef ad ON d.classid = 'pg_attrdef'::regclass AND ad.oid = d.objid
LEFT JOIN pg_attribute ga ON ga.attrelid = ad.adrelid AND ga.attnum = ad.adnum AND ga.attgenerated <> ''
LEFT JOIN pg_index ix ON d.classid = 'pg_class'::regclass AND ix.indexrelid = d.objid
LEFT JOIN pg_constraint ic ON ic.conindid = ix.indexrelid AND ic.conrelid = ix.indrelid AND ic.contype IN ('p', 'u', 'x')
CROSS JOIN LATERAL (SELECT
    CASE WHEN rw.oid IS NOT NULL OR ga.attnum IS NOT NULL THEN 'pg_class'::regclass::oid
         WHEN ic.oid IS NOT NULL THEN 'pg_constraint'::regclass::oid
         ELSE d.classid END::int8 AS classid,
    CASE WHEN rw.oid IS NOT NULL THEN rw.ev_class
         WHEN ga.attnum IS NOT NULL THEN ga.attrelid
         WHEN ic.oid IS NOT NULL THEN ic.oid
         ELSE d.objid END::int8 AS objid,
    CASE WHEN rw.oid IS NOT NULL OR ic.oid IS NOT NULL THEN 0
         WHEN ga.attnum IS NOT NULL THEN ga.attnum
         ELSE d.objsubid END::int4 AS objsubid) n
WHERE d.deptype IN ('n', 'a')
GROUP BY n.classid, n.objid, n.objsubid
ORDER BY parent, n.classid, n.objid, n.objsubid`

// describeObjects names objects and says which table each belongs to and
// which columns of the tables $4 it depends on, as "relid:attnum".
const describeObjects = `
SELECT f.i,
       pg_describe_object(f.classid, f.objid, f.objsubid) AS description,
       COALESCE(c.relkind::text, '') AS relkind,
       COALESCE(a.attname::text, ada.attname::text, '') AS attname,
       COALESCE(a.attgenerated::text, '') AS attgenerated,
       COALESCE(con.contype::text, '') AS contype,
       COALESCE(CASE
           WHEN f.classid = 'pg_class'::regclass AND f.objsubid <> 0 THEN f.objid
           WHEN f.classid = 'pg_class'::regclass AND c.relkind IN ('i', 'I') THEN ix.indrelid
           WHEN f.classid = 'pg_class'::regclass AND c.relkind = 'S' THEN COALESCE(
               (SELECT sd.refobjid FROM pg_depend sd
                WHERE sd.classid = 'pg_class'::regclass AND sd.objid = f.objid AND sd.refclassid = 'pg_class'::regclass
                  AND sd.refobjsubid <> 0 AND sd.deptype IN ('a', 'i') LIMIT 1), f.objid)
           WHEN f.classid = 'pg_class'::regclass THEN f.objid
           WHEN f.classid = 'pg_constraint'::regclass THEN NULLIF(con.conrelid, 0)
           WHEN f.classid = 'pg_trigger'::regclass THEN tg.tgrelid
           WHEN f.classid = 'pg_policy'::regclass THEN pol.polrelid
           WHEN f.classid = 'pg_rewrite'::regclass THEN rw.ev_class
           WHEN f.classid = 'pg_statistic_ext'::regclass THEN st.stxrelid
           WHEN f.classid = 'pg_attrdef'::regclass THEN ad.adrelid
           WHEN f.classid = 'pg_type'::regclass THEN NULLIF(ty.typrelid, 0)
       END, 0)::int8 AS owner,
       COALESCE(COALESCE(c.relname, con.conname, tg.tgname, pol.polname, rw.rulename, st.stxname, p.proname, ty.typname)::text, '') AS name,
       COALESCE(ns.nspname::text, '') AS name_schema,
       COALESCE(CASE WHEN p.oid IS NOT NULL THEN pg_get_function_identity_arguments(p.oid) END, '') AS args,
       ARRAY(SELECT DISTINCT dd.refobjid::text || ':' || dd.refobjsubid FROM pg_depend dd
             WHERE dd.classid = f.classid AND dd.objid = f.objid AND dd.objsubid = f.objsubid
               AND dd.refclassid = 'pg_class'::regclass AND dd.refobjid = ANY ($4::oid[]) AND dd.refobjsubid <> 0
               AND dd.deptype IN ('n', 'a')) AS table_columns
FROM unnest($1::oid[], $2::oid[], $3::int4[]) WITH ORDINALITY AS f(classid, objid, objsubid, i)
LEFT JOIN pg_class c ON f.classid = 'pg_class'::regclass AND c.oid = f.objid
LEFT JOIN pg_attribute a ON f.classid = 'pg_class'::regclass AND f.objsubid <> 0 AND a.attrelid = f.objid AND a.attnum = f.objsubid
LEFT JOIN pg_index ix ON ix.indexrelid = c.oid
LEFT JOIN pg_constraint con ON f.classid = 'pg_constraint'::regclass AND con.oid = f.objid
LEFT JOIN pg_trigger tg ON f.classid = 'pg_trigger'::regclass AND tg.oid = f.objid
LEFT JOIN pg_policy pol ON f.classid = 'pg_policy'::regclass AND pol.oid = f.objid
LEFT JOIN pg_rewrite rw ON f.classid = 'pg_rewrite'::regclass AND rw.oid = f.objid
LEFT JOIN pg_statistic_ext st ON f.classid = 'pg_statistic_ext'::regclass AND st.oid = f.objid
LEFT JOIN pg_attrdef ad ON f.classid = 'pg_attrdef'::regclass AND ad.oid = f.objid
LEFT JOIN pg_attribute ada ON ada.attrelid = ad.adrelid AND ada.attnum = ad.adnum
LEFT JOIN pg_proc p ON f.classid = 'pg_proc'::regclass AND p.oid = f.objid
LEFT JOIN pg_type ty ON f.classid = 'pg_type'::regclass AND ty.oid = f.objid
LEFT JOIN pg_namespace ns ON ns.oid = COALESCE(CASE WHEN f.objsubid = 0 THEN c.relnamespace END, st.stxnamespace, p.pronamespace, ty.typnamespace)
ORDER BY f.i`

// relationNames names tables by oid, quoted.
const relationNames = `
SELECT c.oid::int8 AS oid, n.nspname, c.relname, c.relkind::text AS relkind
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = ANY ($1::oid[])`

// maxDependentDepth bounds the walk through pg_depend; chains of views on
// views are rarely deeper than a few levels.
const maxDependentDepth = 16

type found struct {
	depNode
	parent    int // index into the found list, -1 for a start node
	column    string
	auto      bool // reached through an automatic dependency
	info      objectInfo
	described bool
}

type objectInfo struct {
	I            int64          `db:"i"`
	Description  string         `db:"description"`
	RelKind      string         `db:"relkind"`
	AttName      string         `db:"attname"`
	AttGenerated string         `db:"attgenerated"`
	ConType      string         `db:"contype"`
	Owner        int64          `db:"owner"`
	Name         string         `db:"name"`
	NameSchema   string         `db:"name_schema"`
	Args         string         `db:"args"`
	TableColumns pq.StringArray `db:"table_columns"`
}

// removalDependents walks pg_depend from one removal's columns (or its
// table and row type) and classifies what it finds. It also returns the
// relations, quoted, other than the removal's own tables, that the listed
// dependents are or belong to (views, tables holding a foreign key): the
// runner locks them before a DROP … CASCADE so that nothing new can come
// to depend on them unseen.
func removalDependents(ctx context.Context, q sqlx.QueryerContext, r Removal) ([]Dependent, []string, error) {
	var tables []struct {
		OID     int64 `db:"oid"`
		RelType int64 `db:"reltype"`
	}
	if err := sqlx.SelectContext(ctx, q, &tables, `
		SELECT oid::int8 AS oid, reltype::int8 AS reltype FROM pg_class WHERE oid = to_regclass($1)`, r.QuotedTable()); err != nil {
		return nil, nil, err
	}
	if len(tables) == 0 {
		return nil, nil, nil // already dropped, or never there
	}
	table := tables[0]
	pgClass, err := catalogOID(ctx, q, "pg_class")
	if err != nil {
		return nil, nil, err
	}
	whole := len(r.Columns) == 0

	// The table's descendants: DROP COLUMN recurses to inheritance children
	// and partitions, and DROP TABLE takes the partitions along.
	var family []struct {
		OID       int64 `db:"oid"`
		Partition bool  `db:"relispartition"`
	}
	if err := sqlx.SelectContext(ctx, q, &family, `
		WITH RECURSIVE d(relid) AS (
			SELECT $1::oid
			UNION
			SELECT i.inhrelid FROM pg_inherits i JOIN d ON i.inhparent = d.relid)
		SELECT c.oid::int8 AS oid, c.relispartition FROM d JOIN pg_class c ON c.oid = d.relid`, table.OID); err != nil {
		return nil, nil, err
	}
	// own holds the tables whose parts go with the removal.
	own := map[int64]bool{table.OID: true}
	var familyIDs pq.Int64Array
	for _, f := range family {
		if !whole || f.Partition || f.OID == table.OID {
			own[f.OID] = true
			familyIDs = append(familyIDs, f.OID)
		}
	}

	// removed holds the removed columns that still exist, in each table.
	removed := map[relColumn]bool{}
	var nodes []*found
	visited := map[depNode]int{}
	add := func(f *found) {
		visited[f.depNode] = len(nodes)
		nodes = append(nodes, f)
	}
	if !whole {
		var cols []struct {
			Rel  int64  `db:"attrelid"`
			Name string `db:"attname"`
			Num  int32  `db:"attnum"`
		}
		if err := sqlx.SelectContext(ctx, q, &cols, `
			SELECT attrelid::int8 AS attrelid, attname, attnum::int4 AS attnum FROM pg_attribute
			WHERE attrelid = ANY ($1::oid[]) AND attname = ANY ($2) AND attnum > 0 AND NOT attisdropped
			ORDER BY attrelid <> $3, array_position($2, attname::text), attrelid`,
			familyIDs, pq.StringArray(r.Columns), table.OID); err != nil {
			return nil, nil, err
		}
		if len(cols) == 0 || cols[0].Rel != table.OID {
			return nil, nil, nil
		}
		for _, c := range cols {
			removed[relColumn{c.Rel, c.Num}] = true
			add(&found{depNode: depNode{pgClass, c.Rel, c.Num}, parent: -1, column: c.Name})
		}
	} else {
		pgType, err := catalogOID(ctx, q, "pg_type")
		if err != nil {
			return nil, nil, err
		}
		add(&found{depNode: depNode{pgClass, table.OID, 0}, parent: -1})
		// The row type too: columns of other tables and functions can be
		// of the table's type, and DROP TABLE refuses to leave them behind.
		add(&found{depNode: depNode{pgType, table.RelType, 0}, parent: -1})
	}
	starts := len(nodes)

	frontier := nodes
	for depth := 1; len(frontier) > 0 && depth <= maxDependentDepth; depth++ {
		classIDs, objIDs, subIDs := nodeArrays(frontier)
		var steps []struct {
			Parent int64 `db:"parent"`
			Auto   bool  `db:"auto"`
			depNode
		}
		if err := sqlx.SelectContext(ctx, q, &steps, dependentsStep, classIDs, objIDs, subIDs); err != nil {
			return nil, nil, err
		}
		var next []*found
		for _, st := range steps {
			if _, seen := visited[st.depNode]; seen {
				continue
			}
			parent := frontier[st.Parent-1]
			f := &found{depNode: st.depNode, parent: visited[parent.depNode], column: parent.column, auto: st.Auto}
			add(f)
			next = append(next, f)
		}
		if len(next) == 0 {
			break
		}
		classIDs, objIDs, subIDs = nodeArrays(next)
		var infos []objectInfo
		if err := sqlx.SelectContext(ctx, q, &infos, describeObjects, classIDs, objIDs, subIDs, familyIDs); err != nil {
			return nil, nil, err
		}
		for _, info := range infos {
			n := next[info.I-1]
			n.info, n.described = info, true
		}
		frontier = next
	}

	// Name every owning relation once.
	owners := map[int64]bool{table.OID: true}
	for id := range own {
		owners[id] = true
	}
	for _, n := range nodes[starts:] {
		if n.info.Owner != 0 {
			owners[n.info.Owner] = true
		}
	}
	ownerIDs := make([]int64, 0, len(owners))
	for id := range owners {
		ownerIDs = append(ownerIDs, id)
	}
	var rels []struct {
		OID    int64  `db:"oid"`
		Schema string `db:"nspname"`
		Name   string `db:"relname"`
		Kind   string `db:"relkind"`
	}
	if err := sqlx.SelectContext(ctx, q, &rels, relationNames, pq.Int64Array(ownerIDs)); err != nil {
		return nil, nil, err
	}
	relName := make(map[int64]string, len(rels))
	lockable := map[int64]bool{}
	for _, rel := range rels {
		relName[rel.OID] = quoteQualified(rel.Schema, rel.Name)
		// LOCK TABLE takes tables and views only; a materialized view or a
		// foreign table cannot be locked, and stays unguarded.
		lockable[rel.OID] = strings.ContainsAny(rel.Kind, "rpv")
	}
	var lock []string
	locking := map[int64]bool{}

	// Whole relations found (views, other tables): objects that belong to
	// them go with them and are not listed on their own.
	wholeRel := map[int64]bool{}
	for _, n := range nodes[starts:] {
		if n.ClassID == pgClass && n.ObjSubID == 0 && n.info.Owner == n.ObjID && !own[n.ObjID] {
			wholeRel[n.ObjID] = true
		}
	}

	names := make([]string, len(nodes))
	var out []Dependent
	for i, n := range nodes {
		if i < starts || !n.described {
			continue
		}
		kind, name, fix := n.info.identify(n.ClassID == pgClass, n.ObjSubID, relName)
		names[i] = kind + " " + name
		if ownedByRemoval(n, own, removed, whole) {
			continue
		}
		if n.info.Owner != n.ObjID && wholeRel[n.info.Owner] {
			continue
		}
		d := Dependent{Removal: r.Key(), Column: n.column, Kind: kind, Name: name, Auto: n.auto, Cascade: r.Cascade, Fix: fix}
		if whole {
			d.Column = ""
			d.Auto = false
		}
		if n.parent >= starts {
			d.Via = names[n.parent]
		}
		out = append(out, d)
		if o := n.info.Owner; o != 0 && !own[o] && lockable[o] && !locking[o] {
			locking[o] = true
			lock = append(lock, relName[o])
		}
	}
	sort.Strings(lock)
	colOrder := make(map[string]int, len(r.Columns))
	for i, c := range r.Columns {
		colOrder[c] = i
	}
	sort.SliceStable(out, func(i, j int) bool {
		a, b := out[i], out[j]
		if colOrder[a.Column] != colOrder[b.Column] {
			return colOrder[a.Column] < colOrder[b.Column]
		}
		if (a.Via == "") != (b.Via == "") {
			return a.Via == ""
		}
		if a.Kind != b.Kind {
			return a.Kind < b.Kind
		}
		return a.Name < b.Name
	})
	return out, lock, nil
}

// relColumn is a column of a table.
type relColumn struct {
	rel int64
	num int32
}

// ownedByRemoval reports whether an object is part of what the removal
// drops anyway: for a whole table, anything of the table itself or of its
// partitions; for columns, another removed column (in the table or a
// descendant), or an object PostgreSQL drops with the column (an automatic
// dependency) that involves no other column, such as an index or check
// constraint on the removed columns alone or a serial column's sequence.
func ownedByRemoval(n *found, own map[int64]bool, removed map[relColumn]bool, whole bool) bool {
	if !own[n.info.Owner] {
		return false
	}
	if whole {
		return true
	}
	if n.ObjSubID != 0 && n.ObjID == n.info.Owner { // a column
		return removed[relColumn{n.ObjID, n.ObjSubID}]
	}
	if !n.auto {
		return false
	}
	for _, c := range n.info.TableColumns {
		rel, num, _ := strings.Cut(c, ":")
		r, err1 := strconv.ParseInt(rel, 10, 64)
		a, err2 := strconv.ParseInt(num, 10, 32)
		if err1 != nil || err2 != nil || !removed[relColumn{r, int32(a)}] {
			return false
		}
	}
	return true
}

// identify returns the object's kind, its qualified quoted name and, when
// there is a simple one, the statement that removes it.
func (o objectInfo) identify(isRelation bool, subID int32, relName map[int64]string) (kind, name, fix string) {
	qualified := quoteQualified(o.NameSchema, o.Name)
	owner := relName[o.Owner]
	if owner == "" {
		owner = "?"
	}
	on := pq.QuoteIdentifier(o.Name) + " on " + owner
	onSQL := pq.QuoteIdentifier(o.Name) + " ON " + owner
	switch {
	case isRelation && subID != 0:
		name = owner + "." + pq.QuoteIdentifier(o.AttName)
		if o.AttGenerated != "" {
			// Keeps the column as a plain one, so the base column can go.
			return "generated column", name, "ALTER TABLE " + owner + " ALTER COLUMN " + pq.QuoteIdentifier(o.AttName) + " DROP EXPRESSION"
		}
		return "column", name, ""
	case isRelation:
		switch o.RelKind {
		case "v":
			return "view", qualified, "DROP VIEW " + qualified
		case "m":
			return "materialized view", qualified, "DROP MATERIALIZED VIEW " + qualified
		case "i", "I":
			return "index", qualified, "DROP INDEX " + qualified
		case "S":
			return "sequence", qualified, "DROP SEQUENCE " + qualified
		case "r", "p":
			return "table", qualified, ""
		case "f":
			return "foreign table", qualified, ""
		}
		return "relation", qualified, ""
	}
	switch {
	case o.ConType != "":
		kinds := map[string]string{"f": "foreign key", "c": "check constraint", "u": "unique constraint",
			"p": "primary key", "x": "exclusion constraint", "t": "constraint trigger", "n": "not-null constraint"}
		kind = kinds[o.ConType]
		if kind == "" {
			kind = "constraint"
		}
		if o.Owner == 0 {
			return "domain " + kind, o.Description, ""
		}
		return kind, on, "ALTER TABLE " + owner + " DROP CONSTRAINT " + pq.QuoteIdentifier(o.Name)
	case strings.HasPrefix(o.Description, "trigger "):
		return "trigger", on, "DROP TRIGGER " + onSQL
	case strings.HasPrefix(o.Description, "policy "):
		return "policy", on, "DROP POLICY " + onSQL
	case strings.HasPrefix(o.Description, "rule "):
		return "rule", on, "DROP RULE " + onSQL
	case strings.HasPrefix(o.Description, "statistics object "):
		return "statistics", qualified, "DROP STATISTICS " + qualified
	case strings.HasPrefix(o.Description, "default value for column "):
		col := owner + "." + pq.QuoteIdentifier(o.AttName)
		return "column default", col, "ALTER TABLE " + owner + " ALTER COLUMN " + pq.QuoteIdentifier(o.AttName) + " DROP DEFAULT"
	case o.Args != "" || strings.HasPrefix(o.Description, "function ") || strings.HasPrefix(o.Description, "procedure "):
		kind = strings.SplitN(o.Description, " ", 2)[0]
		return kind, qualified + "(" + o.Args + ")", ""
	case strings.HasPrefix(o.Description, "type "):
		return "type", qualified, ""
	}
	kind, name, _ = strings.Cut(o.Description, " ")
	return kind, name, ""
}

func nodeArrays(ns []*found) (classIDs, objIDs pq.Int64Array, subIDs pq.Int32Array) {
	for _, n := range ns {
		classIDs = append(classIDs, n.ClassID)
		objIDs = append(objIDs, n.ObjID)
		subIDs = append(subIDs, n.ObjSubID)
	}
	return classIDs, objIDs, subIDs
}

func catalogOID(ctx context.Context, q sqlx.QueryerContext, catalog string) (int64, error) {
	var oid int64
	err := sqlx.GetContext(ctx, q, &oid, `SELECT to_regclass($1)::oid::int8`, "pg_catalog."+catalog)
	return oid, err
}
