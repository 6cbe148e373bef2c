package bus_test

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/qubesbus/qubesbus/bus"
)

// A wait ends when its context does, not when the backoff would have.
func TestSleepWatchesContext(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := bus.Sleep(ctx, time.Hour); !errors.Is(err, context.Canceled) {
		t.Fatalf("sleep in an ended context: %v", err)
	}
	if err := bus.Sleep(context.Background(), time.Millisecond); err != nil {
		t.Fatalf("sleep: %v", err)
	}
	b := bus.Backoff{Next: time.Millisecond, Max: 3 * time.Millisecond}
	var waits []time.Duration
	for range 4 {
		waits = append(waits, b.Next)
		if err := b.Wait(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	if want := []time.Duration{time.Millisecond, 2 * time.Millisecond, 3 * time.Millisecond, 3 * time.Millisecond}; !slices.Equal(waits, want) {
		t.Fatalf("waits %v, want %v", waits, want)
	}
	if err := b.Wait(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("backoff in an ended context: %v", err)
	}
	if b.Passes(time.Time{}) || !b.Passes(time.Now()) || b.Passes(time.Now().Add(time.Hour)) {
		t.Fatal("Passes: a zero deadline is never passed, now is, an hour away is not")
	}
}
