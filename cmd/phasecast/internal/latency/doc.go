// Package latency summarises a set of measured durations: min, median, p99
// and max, as the demo and the fleet benchmark report them.
package latency
