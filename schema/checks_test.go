package schema_test

import (
	"fmt"
	"strings"
	"testing"

	"github.com/lib/pq"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/schema"
)

func TestDependents(t *testing.T) {
	t.Parallel()

	// One table with one object of each kind; the table says which ones a
	// removal of "name" must list (with Auto: dropped silently) and which
	// belong to the column and go with it unlisted.
	objects := []struct {
		ddl    string
		listed string // Object(); empty when it must not be listed
		auto   bool
		via    string
	}{
		{ddl: `CREATE INDEX t_name ON APP.t (name)`},
		{ddl: `CREATE INDEX t_name_lower ON APP.t (lower(name))`},
		{ddl: `ALTER TABLE APP.t ADD CONSTRAINT t_name_check CHECK (name <> '')`},
		{ddl: `CREATE UNIQUE INDEX t_name_other_uniq ON APP.t (name) WHERE name IS NOT NULL`},
		{ddl: `CREATE INDEX t_multi ON APP.t (other, name)`, listed: `index Q."t_multi"`, auto: true},
		{ddl: `CREATE INDEX t_partial ON APP.t (other) WHERE name IS NOT NULL`, listed: `index Q."t_partial"`, auto: true},
		{ddl: `CREATE INDEX t_expr ON APP.t ((other || name))`, listed: `index Q."t_expr"`, auto: true},
		{ddl: `ALTER TABLE APP.t ADD CONSTRAINT t_either CHECK (other IS NOT NULL OR name IS NOT NULL)`, listed: `check constraint "t_either" on Q."t"`, auto: true},
		{ddl: `CREATE STATISTICS APP.t_stats ON name, other FROM APP.t`, listed: `statistics Q."t_stats"`, auto: true},
		{ddl: `ALTER TABLE APP.t ADD COLUMN shout text GENERATED ALWAYS AS (upper(name)) STORED`, listed: `generated column Q."t"."shout"`},
		{ddl: `CREATE VIEW APP.v_names AS SELECT id, name FROM APP.t`, listed: `view Q."v_names"`},
		{ddl: `CREATE VIEW APP.v_on_view AS SELECT * FROM APP.v_names`, listed: `view Q."v_on_view"`, via: `view Q."v_names"`},
		{ddl: `CREATE VIEW APP.v_other AS SELECT id, other FROM APP.t`},
		{ddl: `CREATE MATERIALIZED VIEW APP.mv AS SELECT name FROM APP.t`, listed: `materialized view Q."mv"`},
		{ddl: `CREATE INDEX mv_name ON APP.mv (name)`}, // goes with the materialized view
		{ddl: `ALTER TABLE APP.t ADD CONSTRAINT t_code_key UNIQUE (code)`},
		{ddl: `CREATE TABLE APP.other (id int, t_code text CONSTRAINT other_fk REFERENCES APP.t (code))`, listed: `foreign key "other_fk" on Q."other"`},
		{ddl: `CREATE FUNCTION APP.touch() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$`},
		{ddl: `CREATE TRIGGER t_touch BEFORE UPDATE OF name ON APP.t FOR EACH ROW EXECUTE FUNCTION APP.touch()`, listed: `trigger "t_touch" on Q."t"`},
		{ddl: `CREATE TRIGGER t_other BEFORE UPDATE OF other ON APP.t FOR EACH ROW EXECUTE FUNCTION APP.touch()`},
		{ddl: `CREATE POLICY t_policy ON APP.t USING (name <> 'hidden')`, listed: `policy "t_policy" on Q."t"`},
		{ddl: `CREATE SEQUENCE APP.t_seq OWNED BY APP.t.name`},
		{ddl: `CREATE TABLE APP.uses_seq (n bigint DEFAULT nextval('APP.t_seq'))`, listed: `column default Q."uses_seq"."n"`, via: `sequence Q."t_seq"`},
	}

	b := setupContract(t)
	b.exec(`CREATE TABLE APP.t (id int PRIMARY KEY, name text, code text, other text)`)
	q := pq.QuoteIdentifier(b.app)
	want := map[string]schema.Dependent{}
	for _, o := range objects {
		b.exec(o.ddl)
		if o.listed != "" {
			kind, name, _ := strings.Cut(strings.ReplaceAll(o.listed, "Q.", q+"."), " ")
			for _, k := range []string{"materialized view", "check constraint", "foreign key", "generated column", "column default"} {
				if strings.HasPrefix(o.listed, k+" ") {
					kind, name = k, strings.TrimPrefix(strings.ReplaceAll(o.listed, "Q.", q+"."), k+" ")
				}
			}
			column := "name"
			if strings.Contains(o.listed, "other_fk") {
				column = "code"
			}
			want[kind+" "+name] = schema.Dependent{Removal: b.app + ".t", Column: column, Kind: kind, Name: name, Auto: o.auto,
				Via: strings.ReplaceAll(o.via, "Q.", q+".")}
		}
	}
	m := b.manifest(`
release: D
removed:
  - table: APP.t
    columns: [name, code]
`)
	deps, err := b.store.Dependents(b.ctx, b.db, m)
	require.NoError(t, err)
	got := map[string]schema.Dependent{}
	for _, d := range deps {
		require.NotContains(t, got, d.Object(), "listed twice")
		d.Fix = ""
		got[d.Object()] = d
	}
	require.Equal(t, want, got)

	t.Run("FixesAreStatements", func(t *testing.T) {
		fixes := map[string]string{}
		for _, d := range deps {
			fixes[d.Object()] = d.Fix
		}
		require.Equal(t, "DROP VIEW "+q+`."v_names"`, fixes["view "+q+`."v_names"`])
		require.Equal(t, "ALTER TABLE "+q+`."other" DROP CONSTRAINT "other_fk"`, fixes[`foreign key "other_fk" on `+q+`."other"`])
		require.Equal(t, "DROP INDEX "+q+`."t_partial"`, fixes["index "+q+`."t_partial"`])
		require.Equal(t, "ALTER TABLE "+q+`."t" ALTER COLUMN "shout" DROP EXPRESSION`, fixes["generated column "+q+`."t"."shout"`])
		require.Equal(t, `DROP TRIGGER "t_touch" ON `+q+`."t"`, fixes[`trigger "t_touch" on `+q+`."t"`])
		// Each fix is valid SQL that removes the dependency: apply them
		// all and nothing is left.
		tx, err := b.db.Beginx()
		require.NoError(t, err)
		defer tx.Rollback()
		for _, d := range deps {
			if d.Fix != "" {
				_, err := tx.Exec(strings.Replace(strings.Replace(d.Fix, "DROP VIEW", "DROP VIEW IF EXISTS", 1), "DROP MATERIALIZED VIEW", "DROP MATERIALIZED VIEW IF EXISTS", 1) + dropCascade(d))
				require.NoError(t, err, d.Fix)
			}
		}
		left, err := b.store.Dependents(b.ctx, tx, m)
		require.NoError(t, err)
		require.Empty(t, left)
	})

	t.Run("MissingTableOrColumnsFindNothing", func(t *testing.T) {
		for _, yaml := range []string{
			"release: X\nremoved:\n  - table: APP.no_such_table\n    columns: [a]\n",
			"release: X\nremoved:\n  - table: APP.no_such_table\n",
			"release: X\nremoved:\n  - table: APP.t\n    columns: [no_such_column]\n",
		} {
			deps, err := b.store.Dependents(b.ctx, b.db, b.manifest(yaml))
			require.NoError(t, err)
			require.Empty(t, deps, yaml)
			problems, _, err := b.store.CheckSafety(b.ctx, b.db, b.manifest(yaml))
			require.NoError(t, err)
			require.Empty(t, problems, yaml)
		}
	})
}

// dropCascade lets a view's fix take the views built on it along; their
// own fixes then find nothing to drop (IF EXISTS).
func dropCascade(d schema.Dependent) string {
	if d.Kind == "view" || d.Kind == "materialized view" {
		return " CASCADE"
	}
	return ""
}

func TestDependentsOfWholeTable(t *testing.T) {
	t.Parallel()
	b := setupContract(t)
	b.exec(`CREATE TABLE APP.legacy (id int PRIMARY KEY, name text CHECK (name <> ''))`,
		`CREATE INDEX legacy_name ON APP.legacy (name)`,
		`CREATE TABLE APP.uses (id int, legacy_id int CONSTRAINT uses_legacy_fk REFERENCES APP.legacy (id))`,
		`CREATE VIEW APP.v_count AS SELECT count(*) AS n FROM APP.legacy`,
		`CREATE TABLE APP.holder (row_copy APP.legacy)`,
		`CREATE TABLE APP.unrelated (id int)`)
	deps, err := b.store.Dependents(b.ctx, b.db, b.manifest(`
release: W
removed:
  - table: APP.legacy
    cascade: true
`))
	require.NoError(t, err)
	q := pq.QuoteIdentifier(b.app)
	var objects []string
	for _, d := range deps {
		require.Equal(t, b.app+".legacy", d.Removal)
		require.Empty(t, d.Column)
		require.True(t, d.Cascade)
		objects = append(objects, d.Object())
	}
	require.ElementsMatch(t, []string{
		`foreign key "uses_legacy_fk" on ` + q + `."uses"`,
		`view ` + q + `."v_count"`,
		`column ` + q + `."holder"."row_copy"`,
	}, objects)
}

func TestDependentsOfPartitionedTable(t *testing.T) {
	t.Parallel()
	b := setupContract(t)
	b.exec(`CREATE TABLE APP.events (id int, name text, other text) PARTITION BY RANGE (id)`,
		`CREATE TABLE APP.events_1 PARTITION OF APP.events FOR VALUES FROM (0) TO (100)`,
		`CREATE TABLE APP.events_2 PARTITION OF APP.events FOR VALUES FROM (100) TO (200)`,
		`CREATE INDEX events_name ON APP.events (name)`,
		`CREATE INDEX events_1_multi ON APP.events_1 (other, name)`,
		`CREATE VIEW APP.v_part AS SELECT id, name FROM APP.events_2`,
		`CREATE TABLE APP.events_old (id int, name text)`,
		`CREATE TABLE APP.events_older () INHERITS (APP.events_old)`,
		`CREATE VIEW APP.v_child AS SELECT name FROM APP.events_older`)
	q := pq.QuoteIdentifier(b.app)
	objects := func(yaml string) []string {
		deps, err := b.store.Dependents(b.ctx, b.db, b.manifest(yaml))
		require.NoError(t, err)
		var out []string
		for _, d := range deps {
			out = append(out, d.Object())
		}
		return out
	}
	// A column of a partitioned table goes from every partition: objects
	// on a partition count, the partitions' own indexes on it do not.
	require.ElementsMatch(t, []string{`index ` + q + `."events_1_multi"`, `view ` + q + `."v_part"`},
		objects("release: P\nremoved:\n  - table: APP.events\n    columns: [name]\n"))
	// The same for inheritance children.
	require.ElementsMatch(t, []string{`view ` + q + `."v_child"`},
		objects("release: P\nremoved:\n  - table: APP.events_old\n    columns: [name]\n"))
	// Dropping a partitioned table takes its partitions along; a view on a
	// partition still counts. An inheritance child stops DROP TABLE, and
	// CASCADE would take what depends on the child too.
	require.ElementsMatch(t, []string{`view ` + q + `."v_part"`},
		objects("release: P\nremoved:\n  - table: APP.events\n"))
	require.ElementsMatch(t, []string{`table ` + q + `."events_older"`, `view ` + q + `."v_child"`},
		objects("release: P\nremoved:\n  - table: APP.events_old\n"))
}

func TestCheckSafety(t *testing.T) {
	t.Parallel()
	b := setupContract(t)
	b.exec(`CREATE TABLE APP.t (
		id int PRIMARY KEY,
		nullable text,
		not_null text NOT NULL,
		with_default text NOT NULL DEFAULT 'x',
		ident int GENERATED ALWAYS AS IDENTITY,
		gen text GENERATED ALWAYS AS (upper(nullable)) STORED,
		other int)`,
		`CREATE INDEX t_partial ON APP.t (other) WHERE nullable IS NOT NULL`)
	q := pq.QuoteIdentifier(b.app)

	for _, tc := range []struct {
		name     string
		columns  string
		cascade  bool
		problems []schema.Problem
	}{
		{name: "nullable column used only in a partial index predicate", columns: "[nullable]", problems: []schema.Problem{{
			Kind: schema.ProblemDependent, Table: b.app + ".t", Column: "nullable",
			Object: `index ` + q + `."t_partial"`, Fix: `DROP INDEX ` + q + `."t_partial"`,
		}, {
			Kind: schema.ProblemDependent, Table: b.app + ".t", Column: "nullable",
			Object: `generated column ` + q + `."t"."gen"`, Fix: `ALTER TABLE ` + q + `."t" ALTER COLUMN "gen" DROP EXPRESSION`,
		}}},
		{name: "cascade lists instead of refusing", columns: "[nullable]", cascade: true},
		{name: "not null without default", columns: "[not_null, with_default, ident, gen]", problems: []schema.Problem{{
			Kind: schema.ProblemNotNull, Table: b.app + ".t", Column: "not_null",
			Fix: `ALTER TABLE ` + q + `."t" ALTER COLUMN "not_null" DROP NOT NULL`,
		}}},
		{name: "primary key column", columns: "[id]", problems: []schema.Problem{{
			Kind: schema.ProblemNotNull, Table: b.app + ".t", Column: "id",
		}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := b.manifest(fmt.Sprintf("release: S\nremoved:\n  - table: APP.t\n    columns: %s\n    cascade: %v\n", tc.columns, tc.cascade))
			problems, deps, err := b.store.CheckSafety(b.ctx, b.db, m)
			require.NoError(t, err)
			for i := range problems {
				require.NotEmpty(t, problems[i].Detail)
				problems[i].Detail = ""
			}
			require.ElementsMatch(t, tc.problems, problems)
			if tc.cascade {
				require.Len(t, deps, 2)
				for _, d := range deps {
					require.True(t, d.Cascade)
				}
			}
		})
	}

	t.Run("UnsafeErrorListsEverything", func(t *testing.T) {
		m := b.manifest("release: S\nremoved:\n  - table: APP.t\n    columns: [nullable, not_null]\n")
		problems, _, err := b.store.CheckSafety(b.ctx, b.db, m)
		require.NoError(t, err)
		require.Len(t, problems, 3)
		msg := (&schema.UnsafeError{Release: "S", Problems: problems}).Error()
		lines := strings.Split(msg, "\n")
		require.Len(t, lines, 4)
		require.Contains(t, lines[0], `release "S": unsafe contract: 3 problems, first: column "not_null"`)
		require.Contains(t, msg, `DROP NOT NULL`)
		require.Contains(t, msg, `PostgreSQL would drop it silently`)
		require.Contains(t, msg, `the DROP would fail`)
	})
}

func TestContractCheckForceNeverOverridesSafety(t *testing.T) {
	t.Parallel()
	b := setupContract(t)
	b.exec(`CREATE TABLE APP.instances (id int PRIMARY KEY, name text NOT NULL, display_name text)`,
		`CREATE VIEW APP.v AS SELECT display_name FROM APP.instances`)
	b.toMigrate(releaseL)
	b.agent(agentSpec{id: "old", releases: []string{"K"}})

	for _, force := range []bool{false, true} {
		var warned []schema.Problem
		_, err := b.store.Flip(b.ctx, "L", phase.Contract, schema.FlipOptions{Check: b.store.ContractCheck(schema.ContractCheckOptions{
			Force: force, Warn: func(p schema.Problem) { warned = append(warned, p) }})})
		var ue *schema.UnsafeError
		require.ErrorAs(t, err, &ue)
		var kinds []string
		for _, p := range ue.Problems {
			kinds = append(kinds, p.Kind)
		}
		if force {
			require.Equal(t, []string{schema.ProblemNotNull, schema.ProblemDependent}, kinds)
			require.Len(t, warned, 1)
			require.Equal(t, schema.ProblemOldCode, warned[0].Kind)
		} else {
			require.Equal(t, []string{schema.ProblemNotNull, schema.ProblemDependent, schema.ProblemOldCode}, kinds)
			require.Empty(t, warned)
		}
		require.Equal(t, phase.Migrate, b.phase("L"))
	}

	// Fixed in expand (here by hand), the flip goes through with Force.
	b.exec(`ALTER TABLE APP.instances ALTER COLUMN name DROP NOT NULL`, `DROP VIEW APP.v`)
	_, err := b.store.Flip(b.ctx, "L", phase.Contract, schema.FlipOptions{Check: b.store.ContractCheck(schema.ContractCheckOptions{Force: true})})
	require.NoError(t, err)

	// Other flips are not checked: the rollback goes through.
	b.exec(`ALTER TABLE APP.instances ALTER COLUMN name SET NOT NULL`)
	_, err = b.store.Flip(b.ctx, "L", phase.Migrate, schema.FlipOptions{Check: b.store.ContractCheck(schema.ContractCheckOptions{})})
	require.NoError(t, err)
}
