package bench

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/testenv"
)

// TestPollAcksCountsOnlyAcknowledged: the "poll" ack watch counts what the
// contract runner counts as an acknowledgement (schema.Agent.Acked), so
// an agent whose code predates the release is not counted however far it
// has drained, and neither is one short of the epoch or outside the
// fleet's ID prefix.
func TestPollAcksCountsOnlyAcknowledged(t *testing.T) {
	store := testenv.Store(t)
	const epoch = 7
	testenv.Agent(t, store, "fleet-acked", []string{"L"}, epoch, time.Minute)
	testenv.Agent(t, store, "fleet-ahead", []string{"K", "L"}, epoch+1, time.Minute)
	testenv.Agent(t, store, "fleet-old-code", []string{"K"}, epoch, time.Minute)
	testenv.Agent(t, store, "fleet-behind", []string{"L"}, epoch-1, time.Minute)
	testenv.Agent(t, store, "other-acked", []string{"L"}, epoch, time.Minute)

	e := &env{store: store}
	ctx := context.Background()
	// Five fleet agents are awaited, so the poll runs until Wait's limit
	// and sees every row that will ever count.
	times := e.pollAcks(ctx, epoch, "fleet-", 5).Wait(ctx, 300*time.Millisecond)
	require.Len(t, times, 2, "fleet-acked and fleet-ahead acknowledged; fleet-old-code's code predates L, fleet-behind has not drained the epoch")
}
