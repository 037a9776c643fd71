package broadcaster

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/lib/pq"
	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/schema"
)

// contractPending registers release L and flips it to contract, with no
// checks: its contract is then pending.
func contractPending(t testing.TB, store *schema.Store) {
	t.Helper()
	ctx := context.Background()
	m := &schema.Manifest{Release: "L", Removed: []schema.Removal{{Table: "instances", Columns: []string{"name"}}}}
	_, err := store.ApplyRelease(ctx, m, "test")
	require.NoError(t, err)
	for _, to := range []phase.Phase{phase.Migrate, phase.Contract} {
		_, err := store.Flip(ctx, "L", to, schema.FlipOptions{Actor: "test"})
		require.NoError(t, err)
	}
}

// TestAgentsByState: phasecast_agents counts each agent in one state, by
// the store's classification: live, old code (live, but its code predates
// the pending contract's release), fenced (its lease ran out lately, no
// goodbye) and expired (long ago).
func TestAgentsByState(t *testing.T) {
	t.Parallel()
	store := testenv.Store(t)
	contractPending(t, store)
	testenv.Agent(t, store, "new-1", []string{"L"}, 3, time.Minute)
	testenv.Agent(t, store, "new-2", []string{"L"}, 3, time.Minute)
	testenv.Agent(t, store, "old", nil, 3, time.Minute)
	testenv.Agent(t, store, "fenced", []string{"L"}, 3, time.Millisecond)
	testenv.Agent(t, store, "gone", []string{"L"}, 3, time.Millisecond)
	_, err := store.DB().Exec(`UPDATE ` + pq.QuoteIdentifier(store.Schema()) + `.agents SET lease_expires_at = now() - interval '1 hour' WHERE id = 'gone'`)
	require.NoError(t, err)
	time.Sleep(10 * time.Millisecond) // the short leases run out

	got, lag, err := readStandings(context.Background(), store)
	require.NoError(t, err)
	require.Equal(t, map[[2]string]int{
		{"svc", agentLive}: 2, {"svc", agentOldCode}: 1, {"svc", agentFenced}: 1, {"svc", agentExpired}: 1,
	}, got)
	require.Equal(t, int64(3), lag, "nothing published: three epochs (apply, migrate, contract) wait")
}

// BenchmarkReadStandings is the store's share of an uncached scrape with
// a thousand agents registered.
func BenchmarkReadStandings(b *testing.B) {
	store := testenv.Store(b)
	contractPending(b, store)
	for i := range 1000 {
		testenv.Agent(b, store, fmt.Sprintf("agent-%04d", i), []string{"L"}, 3, time.Hour)
	}
	ctx := context.Background()
	for b.Loop() {
		if _, _, err := readStandings(ctx, store); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkGather is a scrape's cost in the broadcaster once the store's
// reading is cached: every family gathered and encoded by the registry.
func BenchmarkGather(b *testing.B) {
	store := testenv.Store(b)
	contractPending(b, store)
	for i := range 1000 {
		testenv.Agent(b, store, fmt.Sprintf("agent-%04d", i), []string{"L"}, 3, time.Hour)
	}
	bc, err := New(&Config{Store: store, DatabaseURL: testenv.DatabaseURL()})
	require.NoError(b, err)
	for b.Loop() {
		if _, err := bc.Metrics().Gather(); err != nil {
			b.Fatal(err)
		}
	}
}
