package cli

import (
	"regexp"
	"testing"
	"time"

	"github.com/lib/pq"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/schema"
)

// TestWatchShowsEveryStanding: the fleet view names each agent's standing
// in each pending contract, and only there.
func TestWatchShowsEveryStanding(t *testing.T) {
	seen := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	agent := func(id string, releases []string, applied, drained, inflight int64, leaseMS int64, goodbye bool) schema.Agent {
		a := schema.Agent{ID: id, Service: "svc", Host: "h", PID: 1, Releases: pq.StringArray(releases),
			AppliedEpoch: applied, DrainedEpoch: drained, Inflight: inflight, LastSeen: seen, LeaseRemainingMS: leaseMS}
		a.LeaseExpiresAt = seen.Add(10 * time.Second)
		if goodbye {
			a.LeaseExpiresAt = seen
		}
		return a
	}
	epoch := int64(7)
	rep := &schema.Report{
		Schema: "phasecast", Epoch: 9, Now: seen,
		Releases: []schema.ReleaseStatus{
			{ReleaseRow: schema.ReleaseRow{Name: "L", Phase: phase.Contract, PhaseEpoch: epoch}, ContractEpoch: &epoch},
			{ReleaseRow: schema.ReleaseRow{Name: "M", Phase: phase.Migrate, PhaseEpoch: 9}},
		},
		Agents: []schema.Agent{
			agent("acked", []string{"L"}, 9, 9, 0, 2000, false),
			agent("draining-guards", []string{"L"}, 7, 6, 2, 2000, false),
			agent("draining", []string{"L"}, 7, 6, 0, 2000, false),
			agent("behind", []string{"L"}, 5, 5, 0, 2000, false),
			agent("old", []string{"K"}, 9, 9, 0, 2000, false),
			agent("fenced", []string{"L"}, 9, 9, 0, -10_000, false),
			agent("left", []string{"L"}, 9, 9, 0, -10_000, true),
			agent("gone", []string{"L"}, 9, 9, 0, -int64(time.Hour/time.Millisecond), false),
		},
		Broadcasters: []schema.Broadcaster{
			{ID: "b1", Host: "h", PID: 2, Leader: true, LastSeen: seen.Add(-time.Second)},
			{ID: "b2", Host: "h", PID: 3, LastSeen: seen.Add(-2 * time.Second)},
			{ID: "b0", Host: "h", PID: 4, Leader: true, LastSeen: seen.Add(-time.Hour)}, // crashed while leading
		},
	}
	view := renderWatch(rep, false)
	for id, want := range map[string]string{
		"acked":           "live +acknowledged",
		"draining-guards": `live +draining \(2 guards open\)`,
		"draining":        "live +draining$",
		"behind":          `live +behind \(at epoch 5\)`,
		"old":             "live +old code",
		"fenced":          "fenced +fenced",
		"left":            "expired +expired",
	} {
		require.Regexp(t, regexp.MustCompile(`(?m)^`+id+` +svc +h/1 +\d+/\d+ +`+want), view, id)
	}
	require.NotContains(t, view, "gone ")
	require.Contains(t, view, "(1 more expired over 10m0s ago)")
	require.Regexp(t, `(?m)^L +contract +7 +1/5 live agents \(contract epoch 7\)$`, view)
	require.Regexp(t, `(?m)^M +migrate +9 +-$`, view)
	require.Contains(t, view, "leader: b1 (h/2); standing by: b2 (h/3); 1 not seen for over 15s")
	require.Regexp(t, `(?m)^AGENT +SERVICE +HOST/PID +APPLIED/DRAINED +LEASE +L$`, view, "one column per pending contract")

	withCountdown := renderWatch(rep, true)
	require.Regexp(t, `(?m)^acked +svc +h/1 +9/9 +2s +acknowledged`, withCountdown)
	require.Contains(t, withCountdown, "leader: b1 (h/2) seen 1s ago; standing by: b2 (h/3) seen 2s ago")

	require.Contains(t, renderWatch(&schema.Report{Schema: "phasecast"}, false), "leader: none")
}

func TestFitWidth(t *testing.T) {
	require.Equal(t, "abc", fitWidth("abc", 3))
	require.Equal(t, "ab…", fitWidth("abcd", 3))
	require.Equal(t, "é…", fitWidth("éèê", 2))
	require.Equal(t, "abcd", fitWidth("abcd", 0))
}
