package bus

import (
	"context"
	"time"
)

// Sleep waits for d, or until ctx ends and then returns ctx's error: a retry loop
// must not outlive its caller by a whole backoff.
func Sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Backoff spaces the attempts of a retry loop: each wait is twice the one before, up
// to Max.
type Backoff struct {
	Next time.Duration // the next wait
	Max  time.Duration // the longest wait
}

// Wait sleeps for the next wait (returning ctx's error if ctx ends first) and doubles
// the one after, up to Max.
func (b *Backoff) Wait(ctx context.Context) error {
	err := Sleep(ctx, b.Next)
	b.Next = min(2*b.Next, b.Max)
	return err
}

// Passes reports whether the next wait would end after deadline; a zero deadline is
// never passed.
func (b *Backoff) Passes(deadline time.Time) bool {
	return !deadline.IsZero() && time.Now().Add(b.Next).After(deadline)
}
