// Package retry holds the two pieces every phasecast component uses when
// something must be tried again: capped exponential backoff with jitter,
// and a sleep that ends early when its context does.
package retry
