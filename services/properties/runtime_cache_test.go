package properties

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/qubesbus/qubesbus/bus/envelope"
	"github.com/qubesbus/qubesbus/schemas/config"
	"github.com/qubesbus/qubesbus/schemas/model"
)

// fakeSource is a lifecycle whose state the test sets; it counts the snapshots asked.
type fakeSource struct {
	mu    sync.Mutex
	snap  model.RuntimeSnapshot
	asked int
}

func (f *fakeSource) RuntimeSnapshot(context.Context) (model.RuntimeSnapshot, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.asked++
	return f.snap, nil
}

func (f *fakeSource) set(state string, ver uint64, settled bool, rev uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.snap = model.RuntimeSnapshot{Values: map[string]model.Runtime{"work": {State: state}},
		Mark: envelope.RuntimeMark{Epoch: 1, Version: ver}, ConfigRev: rev, Settled: settled}
}

func mark(v uint64) envelope.RuntimeMark { return envelope.RuntimeMark{Epoch: 1, Version: v} }

func TestRuntimeCache(t *testing.T) {
	ctx := context.Background()
	src := &fakeSource{}
	c := newRuntimeCache(src, time.Second)
	now := time.Unix(1000, 0)
	c.now = func() time.Time { return now }

	state := func(want envelope.RuntimeMark, rev uint64) string {
		t.Helper()
		vals, _, err := c.get(ctx, want, rev)
		if err != nil {
			t.Fatal(err)
		}
		return vals["work"].State
	}
	expect := func(step, got, want string, asked int) {
		t.Helper()
		if got != want || src.asked != asked {
			t.Fatalf("%s: state %q after %d snapshots, want %q after %d", step, got, src.asked, want, asked)
		}
	}

	src.set("Halted", 10, true, 7)
	expect("first read asks", state(envelope.RuntimeMark{}, 7), "Halted", 1)
	expect("settled snapshot is reused", state(mark(10), 7), "Halted", 1)

	// A Start: its reply carried mark 12; the notice may not have arrived yet.
	src.set("Running", 12, true, 7)
	expect("caller's newer mark forces a fresh snapshot", state(mark(12), 7), "Running", 2)
	expect("and the fresh one is cached", state(mark(12), 7), "Running", 2)

	// A qube stops by itself: only the notice tells.
	src.set("Halted", 14, true, 7)
	c.heardOf(mark(14))
	expect("a notice invalidates", state(envelope.RuntimeMark{}, 7), "Halted", 3)

	// A configuration change (the qrexec feature, a new RemoteVM) may change states.
	expect("another revision invalidates", state(envelope.RuntimeMark{}, 8), "Halted", 4)

	// While an operation is under way nothing is cached.
	src.set("Transient", 15, false, 8)
	c.heardOf(mark(15))
	expect("unsettled snapshot served", state(envelope.RuntimeMark{}, 8), "Transient", 5)
	expect("but not cached", state(envelope.RuntimeMark{}, 8), "Transient", 6)

	// A lost notice is bounded by the maximum age.
	src.set("Running", 16, true, 8)
	c.heardOf(mark(16))
	expect("settled again", state(envelope.RuntimeMark{}, 8), "Running", 7)
	src.set("Halted", 17, true, 8) // its notice is lost
	now = now.Add(999 * time.Millisecond)
	expect("still within the maximum age", state(envelope.RuntimeMark{}, 8), "Running", 7)
	now = now.Add(2 * time.Millisecond)
	expect("past the maximum age", state(envelope.RuntimeMark{}, 8), "Halted", 8)

	// A new lifecycle instance (failover) orders after every mark of the old one.
	src.mu.Lock()
	src.snap.Mark = envelope.RuntimeMark{Epoch: 2, Version: 1}
	src.mu.Unlock()
	expect("new epoch forces a fresh snapshot", state(envelope.RuntimeMark{Epoch: 2, Version: 1}, 8), "Halted", 9)
	expect("cached under the new epoch", state(envelope.RuntimeMark{Epoch: 2, Version: 1}, 8), "Halted", 9)
}

// An older snapshot finishing after a newer one must not replace it.
func TestRuntimeCacheKeepsNewest(t *testing.T) {
	src := &fakeSource{}
	c := newRuntimeCache(src, time.Second)
	src.set("Running", 20, true, 1)
	if _, _, err := c.get(context.Background(), envelope.RuntimeMark{}, 1); err != nil {
		t.Fatal(err)
	}
	c.mu.Lock()
	old := c.snap
	c.mu.Unlock()
	src.set("Halted", 19, true, 1)
	c.heardOf(mark(21)) // force a fetch, which returns an older snapshot
	if _, _, err := c.get(context.Background(), envelope.RuntimeMark{}, 1); err != nil {
		t.Fatal(err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.snap.Mark != old.Mark {
		t.Fatalf("cached mark %v, want the newer %v kept", c.snap.Mark, old.Mark)
	}
}

// A change of this service that cannot move a power state carries the cached snapshot
// over to its revision; any other change, or a revision it did not make, does not.
func TestRuntimeCacheAdvance(t *testing.T) {
	ctx := context.Background()
	src := &fakeSource{}
	c := newRuntimeCache(src, time.Hour)
	src.set("Running", 3, true, 7)
	get := func(rev uint64) {
		t.Helper()
		if _, _, err := c.get(ctx, envelope.RuntimeMark{}, rev); err != nil {
			t.Fatal(err)
		}
	}
	expect := func(step string, asked int) {
		t.Helper()
		if src.asked != asked {
			t.Fatalf("%s: %d snapshots asked, want %d", step, src.asked, asked)
		}
	}
	get(7)
	expect("first read", 1)

	c.advance(8, []config.Op{{Kind: config.OpSetFeature, Domain: "domain-2", Name: "bench", Value: "1"}})
	get(8)
	expect("a feature change carries the snapshot over", 1)

	c.advance(10, []config.Op{{Kind: config.OpAddTag, Domain: "domain-2", Name: "t"}})
	get(10)
	expect("a change that skipped a revision (another writer's) does not", 2)

	src.set("Running", 3, true, 10)
	get(10)
	for i, ops := range [][]config.Op{
		{{Kind: config.OpSetFeature, Domain: "domain-2", Name: "qrexec", Value: "1"}},
		{{Kind: config.OpSetProperty, Domain: "domain-2", Name: "template", Value: "fedora"}},
		{{Kind: config.OpSetGlobalProperty, Name: "default_template", Value: "fedora"}},
		{{Kind: config.OpDelDomain, Domain: "domain-2"}},
		{{Kind: config.OpAddTag, Domain: "domain-2", Name: "t"}, {Kind: config.OpDelFeature, Domain: "domain-2", Name: "qrexec"}},
	} {
		rev := uint64(11 + i)
		asked := src.asked
		src.set("Running", 3, true, rev)
		c.advance(rev, ops)
		get(rev)
		expect(fmt.Sprintf("ops %v", ops), asked+1)
	}
}
