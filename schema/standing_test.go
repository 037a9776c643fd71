package schema_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/testenv"
)

// TestCountConvergedIsAckedOrDrained: CountConverged, the broadcaster's
// convergence check, counts the live agents and, of those, the ones that
// acknowledged a contract flip (Agent.Acked) or drained any other flip's
// epoch, agreeing with the rows read one by one, expired agents left out.
func TestCountConvergedIsAckedOrDrained(t *testing.T) {
	store := testenv.Store(t)
	const epoch = 5
	for ri, releases := range [][]string{nil, {"L"}} {
		for _, drained := range []int64{epoch - 1, epoch, epoch + 1} {
			for _, lease := range []time.Duration{time.Minute, time.Millisecond} {
				testenv.Agent(t, store, fmt.Sprintf("a-%d-%d-%d", ri, drained, lease.Milliseconds()), releases, drained, lease)
			}
		}
	}
	time.Sleep(5 * time.Millisecond) // the short leases run out
	ctx := context.Background()
	agents, err := store.Agents(ctx)
	require.NoError(t, err)
	for _, release := range []string{"", "L", "M"} {
		for _, at := range []int64{epoch - 1, epoch, epoch + 1, epoch + 2} {
			live, done := 0, 0
			for _, a := range agents {
				if !a.Live() {
					continue
				}
				live++
				if (release == "" && a.DrainedEpoch >= at) || (release != "" && a.Acked(release, at)) {
					done++
				}
			}
			cv, err := store.CountConverged(ctx, release, at)
			require.NoError(t, err)
			require.Equal(t, 6, cv.Live)
			require.Equal(t, live, cv.Live)
			require.Equal(t, done, cv.Done, "release %q, epoch %d", release, at)
			require.Equal(t, done == live, cv.Converged())
			require.WithinDuration(t, time.Now(), cv.Now, time.Minute, "the database's clock")
		}
	}
}
