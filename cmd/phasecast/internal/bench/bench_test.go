package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"encoding/xml"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/testenv"
)

// TestSmoke runs the whole benchmark small, against the real servers, and
// checks that the report is sane: every acknowledgement, reply and
// sighting arrived, the floor is faster than phasecast, polling is slower,
// the cost figures are positive, the charts are SVG, and nothing is left
// behind.
func TestSmoke(t *testing.T) {
	db := testenv.DB(t)
	var progress bytes.Buffer
	opts := Options{
		Agents:       []int{1, 5},
		Flips:        3,
		PollInterval: 200 * time.Millisecond,
		Heartbeat:    500 * time.Millisecond,
		// Agents without a DB start on the first beacon.
		BeaconInterval: 200 * time.Millisecond,
		Pause:          50 * time.Millisecond,
		DBConns:        4,
		Cost:           true,
		CostAgents:     5,
		// Long enough that a loaded machine still records statuses in the
		// measured half (at 400ms it sometimes recorded none there).
		CostDuration: time.Second,
		ChartDir:     t.TempDir(),
		DatabaseURL:  testenv.DatabaseURL(),
		AMQPURL:      testenv.AMQPURL(),
		Progress:     &progress,
		Name:         strings.TrimPrefix(testenv.Name("smoke"), "smoke_"),
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	start := time.Now()
	rep, err := Run(ctx, opts)
	require.NoError(t, err, progress.String())
	t.Logf("ran in %s", time.Since(start))

	require.Len(t, rep.Fleets, 2)
	for _, f := range rep.Fleets {
		require.Zero(t, f.Floor.Missing, "floor replies missing at %d", f.Agents)
		require.Zero(t, f.Polling.Missing, "pollers missing at %d", f.Agents)
		require.Equal(t, opts.Flips, f.Floor.PerFlip.N)
		require.Equal(t, opts.Flips*f.Agents, f.Floor.PerAgent.N)
		require.Positive(t, f.Floor.PerFlip.MinMS, "the floor takes time")
		require.Positive(t, f.Polling.QueriesPerSecond)
		require.Len(t, f.Phasecast, 3)
		for _, pc := range f.Phasecast {
			require.Zero(t, pc.Missing, "acks missing at %d agents, path %s", f.Agents, pc.Path)
			require.Equal(t, opts.Flips*f.Agents, pc.PerAgent.N, "every agent acknowledged every flip")
			// Timed from store.Flip's return: on a loaded machine (this
			// test runs with -race beside others) the flipping goroutine
			// may get the COMMIT's reply later than the broadcaster, the
			// agent and the recording do their work, so a flip can come
			// out a few milliseconds negative; the median cannot.
			require.Positive(t, pc.PerFlip.P50MS, "%d agents, path %s: %+v", f.Agents, pc.Path, pc.PerFlip)
			require.Greater(t, pc.PerFlip.MinMS, -50.0, "%d agents, path %s: %+v", f.Agents, pc.Path, pc.PerFlip)
			require.LessOrEqual(t, pc.PerFlip.MinMS, pc.PerFlip.P50MS)
			require.LessOrEqual(t, pc.PerFlip.P50MS, pc.PerFlip.P99MS)
			require.LessOrEqual(t, pc.PerFlip.P99MS, pc.PerFlip.MaxMS)
			require.NotNil(t, pc.Delivered)
			require.LessOrEqual(t, pc.Delivered.P50MS, pc.PerFlip.MaxMS, "an agent has the state before it acknowledges it")
			require.Positive(t, pc.FloorRatioP50)
			require.Positive(t, pc.GoroutinesPerAgent, "agents own goroutines")
			require.Positive(t, pc.HeapBytesPerAgent)
		}
	}
	// Five pollers, phases spread over 200ms: the last sees a flip
	// 160ms or more after it, far behind phasecast's acknowledgements.
	five := rep.Fleets[1]
	for _, pc := range five.Phasecast {
		require.Greater(t, five.Polling.PerFlip.P50MS, pc.PerFlip.P99MS, "polling is slower than phasecast (%s)", pc.Path)
		require.Greater(t, pc.PollingRatioP99, 1.0)
	}

	require.NotNil(t, rep.Cost)
	require.Len(t, rep.Cost.AckedFlips, 3)
	for _, a := range rep.Cost.AckedFlips {
		require.Positive(t, a.FlipsPerSecond, a.Path)
	}
	require.Positive(t, rep.Cost.Burst.Flips)
	require.Positive(t, rep.Cost.Burst.StatesPublished)
	require.Positive(t, rep.Cost.Statuses.RecordedPerSec)
	require.Positive(t, rep.Cost.Statuses.GrantsPerSec)

	require.Len(t, rep.Charts, 2)
	for _, c := range rep.Charts {
		b, err := os.ReadFile(c)
		require.NoError(t, err)
		require.NoError(t, xml.Unmarshal(b, new(struct{})), "%s is well-formed XML", c)
		require.Contains(t, string(b), "<polyline")
	}
	require.Equal(t, filepath.Join(opts.ChartDir, "ack-latency-5.svg"), rep.Charts[1])

	var text bytes.Buffer
	require.NoError(t, rep.WriteText(&text))
	require.Contains(t, text.String(), "phasecast/floor p50")
	_, err = json.Marshal(rep)
	require.NoError(t, err)

	// Cleaned up: the schema is gone.
	var schemas int
	require.NoError(t, db.Get(&schemas, `SELECT count(*) FROM pg_namespace WHERE nspname = $1`, "phasecast_bench_"+opts.Name))
	require.Zero(t, schemas, "the run's schema is dropped")
	conn := testenv.AMQP(t)
	ch, err := conn.Channel()
	require.NoError(t, err)
	_, err = ch.QueueDeclarePassive("phasecast_bench_"+opts.Name+".status", true, false, false, false, nil)
	require.Error(t, err, "the run's status queue is deleted")
}

func TestOptionsValidate(t *testing.T) {
	require.NoError(t, Options{}.withDefaults().Validate())
	bad := Options{Agents: []int{0}, Flips: -1, Paths: []Path{"x"}, AckWatch: "peek"}.withDefaults()
	err := bad.Validate()
	require.Error(t, err)
	for _, want := range []string{"agents: 0", "flips: -1", `paths: "x"`, `ack-watch: "peek"`} {
		require.Contains(t, err.Error(), want)
	}
}
