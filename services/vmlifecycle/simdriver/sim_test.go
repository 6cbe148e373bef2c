package simdriver

import (
	"container/heap"
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/qubesbus/qubesbus/services/vmlifecycle"
)

func TestMemoryPoolAndNotices(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	h := New(Config{MemoryMiB: 1000, ShutdownLatency: -1})
	notices, err := h.Watch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for i, name := range []string{"a", "b"} {
		if err := h.ReserveMemory(ctx, name, 400); err != nil {
			t.Fatal(err)
		}
		d, err := h.Create(ctx, vmlifecycle.DomainSpec{Name: name, MemoryMiB: 400, MaxMemMiB: 4000, VCPUs: 2, VirtMode: "pvh"})
		if err != nil {
			t.Fatal(err)
		}
		if d.XID != i+1 || d.State != vmlifecycle.HVPaused || d.StubdomXID != -1 {
			t.Fatalf("created %+v", d)
		}
	}
	if err := h.ReserveMemory(ctx, "c", 400); !errors.Is(err, vmlifecycle.ErrNotEnoughMemory) {
		t.Fatalf("third 400 MiB of 1000: %v", err)
	}
	// Destroy reports at once; a graceful shutdown, even instant, asynchronously.
	if err := h.Destroy(ctx, "b"); err != nil {
		t.Fatal(err)
	}
	if err := h.Unpause(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	if err := h.Shutdown(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"b", "a"} {
		select {
		case n := <-notices:
			if n.Kind != vmlifecycle.NoticeStopped || n.Name != want {
				t.Fatalf("notice %+v, want %s stopped", n, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("no notice")
		}
	}
	if free := h.FreeMemoryMiB(); free != 1000 {
		t.Fatalf("free %d MiB after both stopped", free)
	}
	if _, ok, _ := h.Domain(ctx, "a"); ok {
		t.Fatal("a still active")
	}
}

// Completions are carried out in the order of their due time, ties in request order:
// shutdowns with the same latency, requested back to back, always report their stops in
// the order they were requested, and a crash due earlier comes before them.
func TestCompletionsInDueOrder(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	h := New(Config{ShutdownLatency: 40 * time.Millisecond})
	notices, err := h.Watch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for i := range 24 {
		names = append(names, fmt.Sprintf("vm%02d", i))
	}
	h.SetFaults("crasher", Faults{CrashAfter: 20 * time.Millisecond})
	for _, name := range append([]string{"crasher"}, names...) {
		if _, err := h.Create(ctx, vmlifecycle.DomainSpec{Name: name, MemoryMiB: 100, VirtMode: "pvh"}); err != nil {
			t.Fatal(err)
		}
		if err := h.Unpause(ctx, name); err != nil {
			t.Fatal(err)
		}
	}
	for _, name := range names {
		if err := h.Shutdown(ctx, name); err != nil {
			t.Fatal(err)
		}
	}
	want := append([]string{"crasher"}, names...)
	for i, name := range want {
		select {
		case n := <-notices:
			if n.Kind != vmlifecycle.NoticeStopped || n.Name != name || n.Crashed != (i == 0) {
				t.Fatalf("notice %d: %+v, want %s stopped", i, n, name)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("no notice %d", i)
		}
	}
}

// Entries due at the same instant run in the order they were scheduled.
func TestDueQueueTies(t *testing.T) {
	h := New(Config{})
	at := time.Now().Add(time.Hour)
	var got []int
	h.mu.Lock()
	for i := range 50 {
		e := &dueEntry{at: at, seq: h.sched.seq, run: func() { got = append(got, i) }}
		h.sched.seq++
		heap.Push(&h.sched.queue, e)
	}
	h.runDueLocked(at)
	h.mu.Unlock()
	for i, v := range got {
		if v != i {
			t.Fatalf("ran %v, want scheduling order", got)
		}
	}
	if len(got) != 50 {
		t.Fatalf("ran %d of 50", len(got))
	}
}
