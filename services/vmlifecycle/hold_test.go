package vmlifecycle_test

import (
	"context"
	"testing"
	"time"

	"github.com/qubesbus/qubesbus/schemas/lifecycle"

	"github.com/qubesbus/qubesbus/services/vmlifecycle/simdriver"
)

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
	done := make(chan reply, 1)
	go func() { done <- x.call("admin.vm.Start", "work", "") }()
	if r := x.call("admin.vm.Start", "personal", ""); r != ok("") { // another qube is not held up
		t.Fatalf("start personal during the hold: %v", r)
	}
	select {
	case r := <-done:
		t.Fatalf("start of a held qube went ahead: %v", r)
	case <-time.After(300 * time.Millisecond):
	}
	release(x.rep.Revision())
	if r := <-done; r != ok("") {
		t.Fatalf("start after the release: %v", r)
	}
}
