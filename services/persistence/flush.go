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

// groupSync runs the change log's syncs one at a time (group commit). A sync covers
// the revision the store held when it started; a caller waits for the running sync if
// that covers its revision, else for the next one, which everyone arriving meanwhile
// shares. No goroutine runs between syncs.
type groupSync struct {
	sync func(rev uint64) error // makes revisions through rev durable
	rev  func() uint64          // the revision the store holds

	mu      sync.Mutex
	running *syncRound // nil while idle
	next    *syncRound // starts when the running one ends
}

type syncRound struct {
	covers uint64 // 0 until it reads the revision it covers
	done   chan struct{}
	err    error
}

// start makes sure a sync starts after this call, without waiting for it: an append
// starts the sync its caller will ask for (SyncThrough) before it asks.
func (g *groupSync) start() {
	g.mu.Lock()
	g.queueLocked()
	g.mu.Unlock()
}

// queueLocked returns the round that starts next, and starts it if nothing runs.
func (g *groupSync) queueLocked() *syncRound {
	if g.next == nil {
		g.next = &syncRound{done: make(chan struct{})}
	}
	r := g.next
	if g.running == nil {
		g.running, g.next = r, nil
		go g.run(r)
	}
	return r
}

// wait returns once a sync covering rev ended (its error), or ctx's error if that
// comes first (the sync still happens).
func (g *groupSync) wait(ctx context.Context, rev uint64) error {
	g.mu.Lock()
	r := g.running
	if r == nil || r.covers < rev {
		r = g.queueLocked()
	}
	g.mu.Unlock()
	select {
	case <-r.done:
		return r.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (g *groupSync) run(r *syncRound) {
	for r != nil {
		// Read outside mu: the store's lock may be held by an append for a while.
		rev := g.rev()
		g.mu.Lock()
		r.covers = rev
		g.mu.Unlock()
		r.err = g.sync(rev)
		close(r.done)
		g.mu.Lock()
		r, g.running, g.next = g.next, g.next, nil
		g.mu.Unlock()
	}
}
