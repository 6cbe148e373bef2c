package properties

import (
	"runtime"
	"sync"
	"testing"
)

// One key is held by one caller at a time, other keys are not held up, and a key
// leaves the map once nobody holds or waits for it.
func TestKeyLocks(t *testing.T) {
	var k keyLocks
	unlockA := k.lock("a")
	unlockB := k.lock("b") // another key: does not wait for a
	got := make(chan struct{})
	go func() {
		unlock := k.lock("a")
		close(got)
		unlock()
	}()
	// The waiter is counted on a's entry before it blocks; wait until it is.
	for {
		k.mu.Lock()
		users := k.m["a"].users
		k.mu.Unlock()
		if users == 2 {
			break
		}
		runtime.Gosched()
	}
	select {
	case <-got:
		t.Fatal("a second caller took a held key")
	default:
	}
	unlockA()
	<-got
	unlockB()
	var wg sync.WaitGroup
	for range 50 {
		wg.Add(1)
		go func() { defer wg.Done(); k.lock("c")() }()
	}
	wg.Wait()
	k.mu.Lock()
	defer k.mu.Unlock()
	if len(k.m) != 0 {
		t.Fatalf("%d keys left in the map after every unlock", len(k.m))
	}
}
