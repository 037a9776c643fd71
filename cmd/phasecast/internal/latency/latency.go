package latency

import (
	"slices"
	"time"
)

// Summary is the distribution of one set of measurements.
type Summary struct {
	N   int           `json:"n"`
	Min time.Duration `json:"min"`
	P50 time.Duration `json:"p50"`
	P99 time.Duration `json:"p99"`
	Max time.Duration `json:"max"`
}

// Summarize computes a Summary; it does not modify ds.
func Summarize(ds []time.Duration) Summary {
	if len(ds) == 0 {
		return Summary{}
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return Summary{N: len(s), Min: s[0], P50: Percentile(s, 50), P99: Percentile(s, 99), Max: s[len(s)-1]}
}

// Percentile returns the nearest-rank p-th percentile of sorted.
func Percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	rank := int(p/100*float64(len(sorted))+0.999999) - 1
	return sorted[min(max(rank, 0), len(sorted)-1)]
}

// Since turns times into latencies after from, in the same order.
func Since(times []time.Time, from time.Time) []time.Duration {
	out := make([]time.Duration, 0, len(times))
	for _, t := range times {
		out = append(out, t.Sub(from))
	}
	return out
}
