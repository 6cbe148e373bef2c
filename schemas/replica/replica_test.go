package replica

import (
	"context"
	"errors"
	"runtime"
	"sort"
	"testing"
	"time"

	"github.com/qubesbus/qubesbus/bus/qerr"
	"github.com/qubesbus/qubesbus/bus/rpc"
	"github.com/qubesbus/qubesbus/schemas/config"
	"github.com/qubesbus/qubesbus/schemas/qubesxml"
)

func load(t *testing.T) *config.Config {
	t.Helper()
	c, err := qubesxml.Load("../../testdata/qubes.xml")
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestResolveApplyWait(t *testing.T) {
	ctx := context.Background()
	r := New(load(t), 1)
	if ref, err := r.ResolveUUID(ctx, AdminVMUUID); err != nil || ref.Name != "dom0" || !ref.IsAdminVM() {
		t.Fatalf("dom0 by its fixed uuid: %+v %v", ref, err)
	}
	work, err := r.ResolveName(ctx, "work")
	if err != nil || work.Class != "AppVM" || work.UUID == "" {
		t.Fatalf("work: %+v %v", work, err)
	}
	if ref, err := r.ResolveUUID(ctx, work.UUID); err != nil || ref.Name != "work" {
		t.Fatalf("work by uuid: %+v %v", ref, err)
	}
	if _, err := r.ResolveName(ctx, "nosuch"); !errors.Is(err, qerr.ErrVMNotFound) {
		t.Fatalf("missing qube: %v", err)
	}

	// A rename is visible to lookups at once; a gap is refused.
	rename := []config.Op{{Kind: config.OpSetProperty, Domain: "domain-5", Name: "name", Value: "job"}}
	if err := r.Apply(3, rename); !errors.Is(err, ErrGap) {
		t.Fatalf("gap: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- r.WaitRevision(ctx, 2) }()
	if err := r.Apply(2, rename); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if _, err := r.ResolveName(ctx, "work"); !errors.Is(err, qerr.ErrVMNotFound) {
		t.Fatalf("old name still resolves: %v", err)
	}
	if ref, err := r.ResolveUUID(ctx, work.UUID); err != nil || ref.Name != "job" {
		t.Fatalf("renamed qube by uuid: %+v %v", ref, err)
	}
	if err := r.Apply(2, rename); err != nil || r.Revision() != 2 {
		t.Fatalf("replayed revision: %v, at %d", err, r.Revision())
	}

	wctx, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancel()
	if err := r.WaitRevision(wctx, 5); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("wait past the deadline: %v", err)
	}
	r.Reset(load(t), 9)
	if _, err := r.ResolveName(ctx, "work"); err != nil || r.Revision() != 9 {
		t.Fatalf("after reset: %v at %d", err, r.Revision())
	}
	if all := refs(r); len(all) != 9 || all[0].Name != "dom0" {
		t.Fatalf("refs %v", all)
	}
}

// Revision called inside a view (which holds the read lock) while a change waits for
// the write lock: a second read lock would wait behind the writer, which waits for the
// view, and storage's volume reads hung this way for good under a stream of changes.
func TestRevisionInsideAViewWithAWriterWaiting(t *testing.T) {
	r := New(load(t), 1)
	op := []config.Op{{Kind: config.OpSetProperty, Domain: "domain-5", Name: "label", Value: "red"}}
	applied := make(chan error, 1)
	viewed := make(chan uint64, 1)
	go r.View(func(*config.Config) {
		go func() { applied <- r.Apply(2, op) }()
		// TryRLock fails once a writer is waiting: the moment the second read lock
		// would block.
		for r.mu.TryRLock() {
			r.mu.RUnlock()
			runtime.Gosched()
		}
		viewed <- r.Revision()
	})
	select {
	case rev := <-viewed:
		if rev != 1 {
			t.Errorf("revision inside the view %d, want 1 (the change waits)", rev)
		}
	case <-time.After(30 * time.Second): // without the fix it never comes
		t.Fatal("Revision inside a view deadlocked behind a waiting writer")
	}
	if err := <-applied; err != nil || r.Revision() != 2 {
		t.Fatalf("the change after the view: %v, at %d", err, r.Revision())
	}
}

// refs returns every qube in admin.vm.List order: dom0 first, then by name (bytes).
func refs(m *Replica) []rpc.Ref {
	m.mu.RLock()
	c := m.x.Config()
	out := make([]rpc.Ref, 0, len(c.Domains))
	for i := range c.Domains {
		out = append(out, refOf(&c.Domains[i]))
	}
	m.mu.RUnlock()
	sort.Slice(out, func(i, j int) bool {
		if a, b := out[i].IsAdminVM(), out[j].IsAdminVM(); a != b {
			return a
		}
		return out[i].Name < out[j].Name
	})
	return out
}
