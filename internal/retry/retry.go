package retry

import (
	"context"
	"math/rand/v2"
	"time"
)

// Backoff yields capped exponential delays with full jitter.
type Backoff struct {
	Min, Max time.Duration
	attempt  int
}

// Next returns the next delay: a random duration in [Min, min(Max, Min·2ⁿ)].
func (b *Backoff) Next() time.Duration {
	ceiling := b.Min << min(b.attempt, 30)
	if ceiling > b.Max || ceiling <= 0 {
		ceiling = b.Max
	}
	b.attempt++
	return b.Min + rand.N(ceiling-b.Min+1)
}

// Reconnect returns the pacing of every reconnect, and of every retry
// after a database error: 100ms doubling up to 5s, with jitter.
func Reconnect() Backoff { return Backoff{Min: 100 * time.Millisecond, Max: 5 * time.Second} }

// Reset starts the sequence again after a success.
func (b *Backoff) Reset() { b.attempt = 0 }

// Sleep waits d or until ctx is done, whichever comes first.
func Sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
