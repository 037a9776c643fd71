package demo_test

import (
	"bytes"
	"context"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/lib/pq"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/cmd/phasecast/internal/demo"
	"github.com/phasecast/phasecast/internal/testenv"
)

// TestDemoShowsTheDifference runs the demo once: the release without the
// gate (flip to contract, DROP at once) loses queries to the dropped
// columns, the run with phasecast loses none, and both are printed side
// by side. Neither run leaves its schemas behind.
func TestDemoShowsTheDifference(t *testing.T) {
	db := testenv.DB(t)
	holdHeavyLock(t, db)
	name := testenv.Name("t")
	schemas := []string{
		"phasecast_demo_" + name, "demo_" + name,
		"phasecast_demo_" + name + demo.UngatedSuffix, "demo_" + name + demo.UngatedSuffix,
	}
	t.Cleanup(func() {
		for _, s := range schemas {
			testenv.DropSchema(t, db, s)
		}
	})

	var out bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	rep, err := demo.Run(ctx, demo.Options{
		Agents: 5, Workers: 2, Name: name, Out: &out,
		DatabaseURL: testenv.DatabaseURL(), AMQPURL: testenv.AMQPURL(),
	})
	require.NoError(t, err, out.String())
	text := out.String()
	t.Log(text)

	// With phasecast: nothing lost.
	require.Positive(t, rep.Queries)
	require.Zero(t, rep.Failed, text)
	require.Empty(t, rep.FirstError, text)
	require.Equal(t, 5, rep.AckLatency.N, text)

	// Without the gate: the DROP lands before the agents could drain, and
	// queries naming the old columns fail with undefined_column.
	u := rep.Ungated
	require.Empty(t, u.Error, text)
	require.Positive(t, u.Queries, text)
	require.Positive(t, u.Failed, "the run without the gate lost no query:\n%s", text)
	require.Contains(t, u.FirstError, "42703", text)
	require.Less(t, u.AckedAtDrop, 5, "every agent had acknowledged before the hurried DROP:\n%s", text)

	// Side by side, with the figures of both runs.
	require.Contains(t, text, "side by side")
	row := func(label string) []string {
		m := regexp.MustCompile(`(?m)^  ` + label + ` +(\S+) +(\S+)$`).FindStringSubmatch(text)
		require.NotNil(t, m, "no %q row in:\n%s", label, text)
		return m[1:]
	}
	require.Regexp(t, `(?m)^ +without the gate +with phasecast$`, text)
	require.Equal(t, []string{strconv.FormatInt(u.Queries, 10), strconv.FormatInt(rep.Queries, 10)}, row("queries run"))
	require.Equal(t, []string{strconv.FormatInt(u.Failed, 10), "0"}, row("queries failed"))
	require.Regexp(t, `(?m)^  first error +pq: .*\(42703\) +none$`, text)
	require.Contains(t, text, "ok: every agent acknowledged before the drop, and not one query failed")

	var left []string
	require.NoError(t, db.Select(&left, `SELECT nspname FROM pg_namespace WHERE nspname = ANY($1)`, pq.Array(schemas)))
	require.Empty(t, left, "the demo left schemas behind")
	for _, prefix := range []string{"phasecast_demo_" + name, "phasecast_demo_" + name + demo.UngatedSuffix} {
		requireTopologyGone(t, prefix)
	}
}
