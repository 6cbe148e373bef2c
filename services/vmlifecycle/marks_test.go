package vmlifecycle_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/schemas/lifecycle"

	"github.com/qubesbus/qubesbus/services/vmlifecycle/simdriver"
)

// A runtime snapshot is settled only when no operation was under way while it was
// taken, and every operation moves the mark: that is what lets the properties service
// cache snapshots (properties.runtimeCache).
func TestSnapshotSettlesAndMarksMove(t *testing.T) {
	x := newHost(t, simdriver.Config{ShutdownLatency: -1})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	states := lifecycle.Client{NC: x.nc, Host: x.h}

	before, err := states.RuntimeSnapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !before.Settled || before.Mark.IsZero() || before.ConfigRev == 0 {
		t.Fatalf("idle snapshot: settled %v, mark %v, revision %d", before.Settled, before.Mark, before.ConfigRev)
	}

	// A start waiting for its agent keeps the qube's lock: nothing taken now settles.
	boot := int64(time.Hour / time.Millisecond)
	if _, err := x.lab.Configure(ctx, simdriver.LabConfig{BootLatencyMS: &boot}); err != nil {
		t.Fatal(err)
	}
	sctx, scancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- x.svc.Start(sctx, vm) }()
	x.waitState(vm, "Transient")
	during, err := states.RuntimeSnapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if during.Settled || !before.Mark.Less(during.Mark) || during.Values[vm].State != "Transient" {
		t.Fatalf("snapshot during a start: settled %v, mark %v after %v, %s %+v", during.Settled, during.Mark, before.Mark, vm, during.Values[vm])
	}
	scancel()
	<-done

	after, err := states.RuntimeSnapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !after.Settled || !during.Mark.Less(after.Mark) {
		t.Fatalf("snapshot after the start ended: settled %v, mark %v after %v", after.Settled, after.Mark, during.Mark)
	}
	if m := x.svc.Mark(); m != after.Mark {
		t.Fatalf("service mark %v, snapshot mark %v with nothing in between", m, after.Mark)
	}
}

// While one lifecycle instance takes over from another, nobody answers for a moment:
// a runtime query waits for the next one instead of failing the caller's read.
func TestRuntimeQueryWaitsOutAFailover(t *testing.T) {
	x := newHost(t, simdriver.Config{ShutdownLatency: -1})
	x.stopService()
	if err := x.svcNC.Flush(); err != nil { // the server has dropped the endpoints
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// A connection of its own, whose sends are only the query's.
	nc := bustest.Connect(t, x.ns)
	done := make(chan error, 1)
	go func() {
		_, err := lifecycle.Client{NC: nc, Host: x.h}.RuntimeSnapshot(ctx)
		done <- err
	}()
	// A second send shows the query found nobody and waits for an instance. (A
	// subscriber watching for it would be a responder.)
	bustest.CheckFor(t, 10*time.Second, time.Millisecond, func() error {
		if n := nc.Stats().OutMsgs; n < 2 {
			return fmt.Errorf("query sent %d times", n)
		}
		return nil
	})
	select {
	case err := <-done:
		t.Fatalf("query ended with nobody serving: %v", err)
	default:
	}
	x.startService()
	if err := <-done; err != nil {
		t.Fatalf("query after the takeover: %v", err)
	}
}
