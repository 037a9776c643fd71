package schema_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/testenv"
)

// TestCountAckedIsAcked: CountAcked, the count in SQL, agrees with
// Agent.Acked, the rule the contract runner decides by, for every
// combination of code that knows the release or not, an epoch drained
// short of, at or past the awaited one, a lease live or expired, and an ID
// inside the prefix or not.
func TestCountAckedIsAcked(t *testing.T) {
	store := testenv.Store(t)
	const epoch = 5
	for _, prefix := range []string{"in-", "out-"} {
		for ri, releases := range [][]string{nil, {"K"}, {"L"}, {"K", "L"}} {
			for _, drained := range []int64{epoch - 1, epoch, epoch + 1} {
				for _, lease := range []time.Duration{time.Minute, time.Millisecond} {
					testenv.Agent(t, store, fmt.Sprintf("%s%d-%d-%d", prefix, ri, drained, lease.Milliseconds()), releases, drained, lease)
				}
			}
		}
	}
	ctx := context.Background()
	agents, err := store.Agents(ctx)
	require.NoError(t, err)
	require.Len(t, agents, 48)
	counted := 0
	for _, release := range []string{"K", "L", "M"} {
		for _, at := range []int64{epoch - 1, epoch, epoch + 1, epoch + 2} {
			for _, prefix := range []string{"", "in-", "none-"} {
				want := 0
				for _, a := range agents {
					if strings.HasPrefix(a.ID, prefix) && a.Acked(release, at) {
						want++
					}
				}
				got, err := store.CountAcked(ctx, release, at, prefix)
				require.NoError(t, err)
				require.Equal(t, want, got, "release %s, epoch %d, prefix %q", release, at, prefix)
				counted += got
			}
		}
	}
	require.Positive(t, counted, "some agents acknowledged")
}
