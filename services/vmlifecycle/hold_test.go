package vmlifecycle_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/qubesbus/qubesbus/schemas/lifecycle"

	"github.com/qubesbus/qubesbus/services/vmlifecycle/simdriver"
)

// atSelect is a context that reports the first call of Done: a Start's first use of
// its context is the select on the qube's lock, so the report says the Start waits
// there.
type atSelect struct {
	context.Context
	once    sync.Once
	waiting chan struct{}
}

func (c *atSelect) Done() <-chan struct{} {
	c.once.Do(func() { close(c.waiting) })
	return c.Context.Done()
}

// While another service holds a qube, no power operation on it begins; it runs once
// the hold is released, and only that qube waits.
func TestHoldKeepsOperationsOut(t *testing.T) {
	x := newHost(t, simdriver.Config{ShutdownLatency: -1})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	states := lifecycle.Client{NC: x.nc, Host: x.h}
	before := x.svc.Mark()
	after, release, err := states.Hold(ctx, "work")
	if err != nil {
		t.Fatal(err)
	}
	if !before.Less(after) {
		t.Fatalf("mark after the hold %v does not follow %v", after, before)
	}
	if !x.svc.Locked("work") {
		t.Fatal("the hold does not keep work's lock")
	}
	if r := x.call("admin.vm.Start", "personal", ""); r != ok("") { // another qube is not held up
		t.Fatalf("start personal during the hold: %v", r)
	}
	sctx := &atSelect{Context: ctx, waiting: make(chan struct{})}
	done := make(chan error, 1)
	go func() { done <- x.svc.Start(sctx, "work") }()
	<-sctx.waiting
	// The Start waits on work's lock, which the hold has: it cannot have begun.
	select {
	case err := <-done:
		t.Fatalf("start of a held qube went ahead: %v", err)
	default:
	}
	if !x.svc.Locked("work") {
		t.Fatal("the hold lost work's lock while a Start waited")
	}
	release(x.rep.Revision())
	if err := <-done; err != nil {
		t.Fatalf("start after the release: %v", err)
	}
}
