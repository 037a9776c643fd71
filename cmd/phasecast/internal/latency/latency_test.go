package latency

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestSummarize(t *testing.T) {
	var ds []time.Duration
	for i := 100; i >= 1; i-- {
		ds = append(ds, time.Duration(i)*time.Millisecond)
	}
	s := Summarize(ds)
	require.Equal(t, Summary{N: 100, Min: time.Millisecond, P50: 50 * time.Millisecond, P99: 99 * time.Millisecond, Max: 100 * time.Millisecond}, s)
	require.Equal(t, 100*time.Millisecond, ds[0], "input left unsorted")
	require.Equal(t, Summary{}, Summarize(nil))
	require.Equal(t, 7*time.Millisecond, Summarize([]time.Duration{7 * time.Millisecond}).P99)
}
