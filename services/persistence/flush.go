package persistence

import (
	"context"
	"sync"
)

// flusher coalesces qubes.xml writes (group commit). A caller joins the next round,
// which starts only after it joined, so the write it waits for includes its change;
// everyone who joins while a write runs shares the following one. No goroutine runs
// between rounds.
type flusher struct {
	write func() error // writes the state as of when it is called

	mu      sync.Mutex
	next    *flushRound // the round that starts when the running one ends
	running bool        // a goroutine is working through rounds
}

type flushRound struct {
	done chan struct{}
	err  error
}

// wait joins the next write and returns its result, or ctx's error if that comes first
// (the write still happens).
func (f *flusher) wait(ctx context.Context) error {
	f.mu.Lock()
	if f.next == nil {
		f.next = &flushRound{done: make(chan struct{})}
	}
	r := f.next
	if !f.running {
		f.running = true
		go f.run()
	}
	f.mu.Unlock()
	select {
	case <-r.done:
		return r.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (f *flusher) run() {
	for {
		f.mu.Lock()
		r := f.next
		f.next = nil
		if r == nil {
			f.running = false
			f.mu.Unlock()
			return
		}
		f.mu.Unlock()
		r.err = f.write()
		close(r.done)
	}
}
