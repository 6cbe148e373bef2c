package simdriver

import (
	"context"
	"errors"
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
