package rpc

import (
	"sync"
	"testing"
)

// A call never waits for another: calls that block all run at once.
func TestWorkersDoNotBoundCalls(t *testing.T) {
	w := newWorkers()
	const n = 50
	var started, release sync.WaitGroup
	started.Add(n)
	release.Add(1)
	done := make(chan struct{}, n)
	for i := 0; i < n; i++ {
		w.run(func() {
			started.Done()
			release.Wait()
			done <- struct{}{}
		})
	}
	started.Wait() // would hang if a call waited for a free worker
	release.Done()
	for i := 0; i < n; i++ {
		<-done
	}
	if got := w.started.Load(); got != n {
		t.Fatalf("%d goroutines started for %d calls blocked together, want %d", got, n, n)
	}
}

// Calls one after another run on the goroutine that ran the one before, which goes on
// straight to wait for work when a call returns.
func TestWorkersReuseGoroutines(t *testing.T) {
	w := newWorkers()
	const n = 200
	done := make(chan int)
	for i := 0; i < n; i++ {
		w.run(func() { done <- i })
		if got := <-done; got != i {
			t.Fatalf("call %d ran as %d", i, got)
		}
	}
	if got := w.started.Load(); got > n/4 {
		t.Fatalf("%d goroutines started for %d calls in a row, want few", got, n)
	}
}

func deepStack(n int) int {
	var pad [256]byte
	pad[n%256] = byte(n)
	if n == 0 {
		return int(pad[0])
	}
	return deepStack(n-1) + int(pad[n%256])
}

// A call that needs a 32 KiB stack: on a new goroutine each time, against the pool.
func BenchmarkWorkers(b *testing.B) {
	call := func(done chan<- struct{}) func() {
		return func() { deepStack(100); done <- struct{}{} }
	}
	b.Run("go", func(b *testing.B) {
		done := make(chan struct{})
		for b.Loop() {
			go call(done)()
			<-done
		}
	})
	b.Run("workers", func(b *testing.B) {
		w := newWorkers()
		done := make(chan struct{})
		for b.Loop() {
			w.run(call(done))
			<-done
		}
	})
}
