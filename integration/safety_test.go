package integration

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/broadcaster"
	"github.com/phasecast/phasecast/cmd/phasecast/cli"
	"github.com/phasecast/phasecast/internal/phase"
)

// Issue "Refuse unsafe contracts", end to end: the checks of 'phasecast
// flip L contract' and of the runner, against live agents and real
// catalogs.

// TestRefuseOldCode: a live agent whose code predates L blocks the flip
// (unless forced) and the runner, until it is gone.
func TestRefuseOldCode(t *testing.T) {
	t.Parallel()
	const lease = 2 * time.Second
	e := e2eSetup(t)
	e.createInstances()
	e.apply(e2eReleaseL)
	e.startBroadcaster(true, func(c *broadcaster.Config) { c.LeaseDuration = lease })
	oldCfg := e.agentConfig("nova-compute", true)
	oldCfg.Releases = []string{"K"}
	oldCfg.InitialLease = lease
	old := e.startAgent(oldCfg)
	current := e.startAgent(e.agentConfig("nova-api", true))
	e.toMigrate()

	code, out, errOut := e.cli("flip", "L", "contract")
	require.Equal(t, cli.ExitUnsafe, code, "stdout:\n%s\nstderr:\n%s", out, errOut)
	require.Contains(t, errOut, fmt.Sprintf("agent %s (service nova-compute", old.ID()))
	require.Contains(t, errOut, `runs code that predates release "L"`)
	require.NotContains(t, errOut, current.ID())
	require.Equal(t, phase.Migrate, e.phase("L"), "a refused flip changes nothing")

	code, out, errOut = e.cli("flip", "L", "contract", "--force")
	require.Zero(t, code, "stdout:\n%s\nstderr:\n%s", out, errOut)
	require.Contains(t, out, "release L: migrate → contract")
	require.Contains(t, errOut, "warning: agent "+old.ID())
	require.Contains(t, errOut, `predates release "L"`)
	epoch := e.epoch()
	// Both acknowledge: old code hides the removed columns too, but its
	// acknowledgement does not count for L.
	e.waitDrained(epoch, old, current)

	code, out, errOut = e.cli("contract", "L", "--timeout", "3s")
	require.Equal(t, cli.ExitTimeout, code, "stdout:\n%s\nstderr:\n%s", out, errOut)
	require.Contains(t, errOut, "1 running code that predates L ("+old.ID()+": service nova-compute")
	require.NotContains(t, errOut, current.ID())
	require.Contains(t, out, "agents: 1 acknowledged, 0 missing, 1 running code that predates L")
	require.Contains(t, e.columns("instances"), "name", "nothing dropped")
	require.Equal(t, phase.Contract, e.phase("L"))

	// A rolling deploy: the replacement knows L, the old instance stops
	// with no work open and says goodbye, so the runner goes ahead at
	// once instead of waiting out its lease.
	newCfg := e.agentConfig("nova-compute", true)
	newCfg.Releases = []string{"K", "L"}
	replacement := e.startAgent(newCfg)
	e2eStopAgent(t, old)
	stopped := time.Now()
	code, out, errOut = e.cli("contract", "L", "--timeout", "15s")
	require.Zero(t, code, "stdout:\n%s\nstderr:\n%s", out, errOut)
	require.Contains(t, out, "release L: complete")
	require.Contains(t, out, "agents: 2 acknowledged, 0 missing, 0 running code that predates L")
	contracted := time.Since(stopped)
	t.Logf("contracted %s after the old agent stopped", contracted.Round(time.Millisecond))
	require.Less(t, contracted, lease-e2eMargin, "the goodbye ended the old agent's lease; the runner did not wait it out")
	require.Equal(t, []string{"id", "host", "common_name"}, e.columns("instances"))
	require.True(t, e.storeDrained(epoch, current, replacement))
}

// TestRefuseNotNull: a removed column that is NOT NULL without a default
// refuses the flip with the statement that fixes it; once it ran, the
// flip goes through.
func TestRefuseNotNull(t *testing.T) {
	t.Parallel()
	e := e2eSetup(t)
	e.exec(`CREATE TABLE @app.t (id int PRIMARY KEY, legacy text NOT NULL, note text)`, `INSERT INTO @app.t VALUES (1, 'x', 'y')`)
	e.apply(`release: L
removed:
  - table: @app.t
    columns: [legacy]
`)
	e.flip("L", phase.Migrate)
	before := e.storeRows()

	code, out, errOut := e.cli("flip", "L", "contract")
	require.Equal(t, cli.ExitUnsafe, code, "stdout:\n%s\nstderr:\n%s", out, errOut)
	fix := fmt.Sprintf(`ALTER TABLE "%s"."t" ALTER COLUMN "legacy" DROP NOT NULL`, e.app)
	require.Contains(t, errOut, `column "legacy" of `+e.app+`.t is NOT NULL without a default`)
	require.Contains(t, errOut, "(add to expand: "+fix+")")
	require.Equal(t, before, e.storeRows(), "a refused flip changes nothing")

	e.exec(fix)
	code, out, errOut = e.cli("flip", "L", "contract")
	require.Zero(t, code, "stdout:\n%s\nstderr:\n%s", out, errOut)
	require.Equal(t, phase.Contract, e.phase("L"))
}

// e2eCatalog is what the application schema holds: its relations and
// constraints.
type e2eCatalog struct {
	relations, constraints []string
}

func (e *e2eEnv) catalog() e2eCatalog {
	e.t.Helper()
	var c e2eCatalog
	require.NoError(e.t, e.db.SelectContext(e.ctx, &c.relations, `
		SELECT c.relkind::text || ' ' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
		WHERE n.nspname = $1 ORDER BY 1`, e.app))
	require.NoError(e.t, e.db.SelectContext(e.ctx, &c.constraints, `
		SELECT con.contype::text || ' ' || con.conname || ' on ' || c.relname
		FROM pg_constraint con JOIN pg_namespace n ON n.oid = con.connamespace JOIN pg_class c ON c.oid = con.conrelid
		WHERE n.nspname = $1 ORDER BY 1`, e.app))
	return c
}

// TestRefuseDependents: a view on a removed column and a foreign key from
// another table onto one are each listed and refuse the flip; with
// cascade: true they go with the columns, and nothing else does.
func TestRefuseDependents(t *testing.T) {
	t.Parallel()
	e := e2eSetup(t)
	e.exec(
		`CREATE TABLE @app.t (id int PRIMARY KEY, name text, note text)`,
		`CREATE VIEW @app.v_names AS SELECT id, name FROM @app.t`,
		`CREATE VIEW @app.v_notes AS SELECT id, note FROM @app.t`,
		`CREATE TABLE @app.parent (id int PRIMARY KEY, code text UNIQUE, label text)`,
		`CREATE TABLE @app.child (id int PRIMARY KEY, parent_code text REFERENCES @app.parent (code), parent_id int REFERENCES @app.parent (id))`,
	)
	const removals = `
removed:
  - table: @app.t
    columns: [name]
    cascade: %[1]t
  - table: @app.parent
    columns: [code]
    cascade: %[1]t
`
	e.apply("release: L" + fmt.Sprintf(removals, false))
	e.flip("L", phase.Migrate)
	view := fmt.Sprintf(`view "%s"."v_names"`, e.app)
	fk := fmt.Sprintf(`foreign key "child_parent_code_fkey" on "%s"."child"`, e.app)

	code, out, errOut := e.cli("flip", "L", "contract")
	require.Equal(t, cli.ExitUnsafe, code, "stdout:\n%s\nstderr:\n%s", out, errOut)
	require.Contains(t, errOut, "unsafe contract: 2 problems")
	require.Contains(t, errOut, view+` depends on column "name" of `+e.app+`.t: the DROP would fail`)
	require.Contains(t, errOut, fk+` depends on`)
	require.Contains(t, errOut, `column "code" of `+e.app+`.parent`)
	require.Contains(t, errOut, "set cascade: true")
	require.NotContains(t, errOut, "v_notes")
	require.NotContains(t, errOut, "child_parent_id_fkey")
	require.Equal(t, phase.Migrate, e.phase("L"))

	// A second release says cascade: true for both.
	e.startBroadcaster(true, nil)
	e.apply("release: M" + fmt.Sprintf(removals, true))
	e.flip("M", phase.Migrate)
	code, out, errOut = e.cli("flip", "M", "contract")
	require.Zero(t, code, "stdout:\n%s\nstderr:\n%s", out, errOut)
	require.Contains(t, errOut, "note: "+view+" depends on removal "+e.app+".t, which says cascade: true: the contract drops it too")
	require.Contains(t, errOut, "note: "+fk+" depends on removal "+e.app+".parent, which says cascade: true")
	require.NotContains(t, errOut, "v_notes")
	require.NotContains(t, errOut, "child_parent_id_fkey")

	code, out, errOut = e.cli("contract", "M", "--dry-run")
	require.Zero(t, code, "stdout:\n%s\nstderr:\n%s", out, errOut)
	require.Contains(t, out, "goes with CASCADE: "+view)
	require.Contains(t, out, "goes with CASCADE: "+fk)
	require.Contains(t, out, fmt.Sprintf(`ALTER TABLE "%s"."t" DROP COLUMN IF EXISTS "name" CASCADE;`, e.app))

	before := e.catalog()
	code, out, errOut = e.cli("contract", "M")
	require.Zero(t, code, "stdout:\n%s\nstderr:\n%s", out, errOut)
	require.Contains(t, out, "release M: complete")
	after := e.catalog()

	// The view and the foreign key went; so did the unique index and
	// constraint on parent.code, which are parts of the dropped column.
	require.Equal(t, e2eWithout(before.relations, "v v_names", "i parent_code_key"), after.relations)
	require.Equal(t, e2eWithout(before.constraints, "f child_parent_code_fkey on child", "u parent_code_key on parent"), after.constraints)
	require.Equal(t, []string{"id", "note"}, e.columns("t"))
	require.Equal(t, []string{"id", "label"}, e.columns("parent"))
	require.Equal(t, []string{"id", "parent_code", "parent_id"}, e.columns("child"), "CASCADE drops the constraint, not the referencing column")
}

// e2eWithout returns all minus drop, each of which must be in all.
func e2eWithout(all []string, drop ...string) []string {
	out := slices.Clone(all)
	for _, d := range drop {
		i := slices.Index(out, d)
		if i < 0 {
			panic(fmt.Sprintf("%q is not in %s", d, strings.Join(all, ", ")))
		}
		out = slices.Delete(out, i, i+1)
	}
	return out
}

// TestRefusePartialIndexPredicate: a column named only in a partial
// index's WHERE clause is found.
func TestRefusePartialIndexPredicate(t *testing.T) {
	t.Parallel()
	e := e2eSetup(t)
	e.exec(`CREATE TABLE @app.t (id int PRIMARY KEY, name text, status text)`,
		`CREATE INDEX t_status_named ON @app.t (status) WHERE name IS NOT NULL`)
	e.apply(`release: L
removed:
  - table: @app.t
    columns: [name]
`)
	e.flip("L", phase.Migrate)

	code, out, errOut := e.cli("flip", "L", "contract")
	require.Equal(t, cli.ExitUnsafe, code, "stdout:\n%s\nstderr:\n%s", out, errOut)
	require.Contains(t, errOut, fmt.Sprintf(`index "%s"."t_status_named" depends on column "name" of %s.t`, e.app, e.app))
	require.Contains(t, errOut, fmt.Sprintf(`(add to expand: DROP INDEX "%s"."t_status_named")`, e.app))
	require.Equal(t, phase.Migrate, e.phase("L"))
}
