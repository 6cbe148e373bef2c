package rpc

import (
	"sync/atomic"
	"time"
)

// workerIdle is how long a worker goroutine waits for another call before it exits.
const workerIdle = 2 * time.Second

// workers runs calls on goroutines that outlive them. A goroutine that finished a
// call waits workerIdle for the next one, keeping the stack it grew: a new goroutine
// per call starts with a small stack and grows it by copying, which a write's
// handlers (encoding, JSON, the stream publishes) do every time. Under load that
// copying was about 4% of a feature.Set's CPU in the profile. There is no bound: a
// call never waits for a worker.
type workers struct {
	idle    chan func()  // unbuffered: a send succeeds only when a worker waits
	started atomic.Int64 // goroutines started, for the tests
}

func newWorkers() *workers { return &workers{idle: make(chan func())} }

// run runs f on an idle worker, or on a new one if none waits.
func (w *workers) run(f func()) {
	select {
	case w.idle <- f:
	default:
		w.started.Add(1)
		go w.work(f)
	}
}

func (w *workers) work(f func()) {
	t := time.NewTimer(workerIdle)
	defer t.Stop()
	for {
		f()
		t.Reset(workerIdle)
		select {
		case f = <-w.idle:
		case <-t.C:
			return
		}
	}
}
