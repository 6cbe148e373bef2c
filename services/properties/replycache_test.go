package properties

import (
	"context"
	"testing"
	"time"
)

func TestReplyCache(t *testing.T) {
	var c replyCache
	k := replyKey{"admin.vm.property.GetAll", "work"}
	if _, ok := c.get(1, 1, k); ok {
		t.Fatal("empty cache answered")
	}
	c.put(3, 0, k, []byte("unkept runtime"))
	if _, ok := c.get(3, 0, k); ok {
		t.Fatal("a reply over runtime values not kept was kept")
	}
	c.put(3, 2, k, []byte("a"))
	if b, ok := c.get(3, 2, k); !ok || string(b) != "a" {
		t.Fatalf("kept reply: %q %v", b, ok)
	}
	for _, at := range [][2]uint64{{4, 2}, {3, 3}, {2, 2}} {
		if _, ok := c.get(at[0], at[1], k); ok {
			t.Errorf("revision %d, snapshot %d served the reply of 3, 2", at[0], at[1])
		}
	}
	c.put(2, 9, k, []byte("older revision"))
	if b, _ := c.get(3, 2, k); string(b) != "a" {
		t.Fatalf("an older revision replaced the cache: %q", b)
	}
	c.put(4, 1, k, []byte("b"))
	if _, ok := c.get(3, 2, k); ok {
		t.Fatal("a newer revision left the old replies")
	}
	if b, ok := c.get(4, 1, k); !ok || string(b) != "b" {
		t.Fatalf("newer revision: %q %v", b, ok)
	}
}

// The runtime cache numbers its snapshots so replies can be kept with them: a snapshot
// taken again at the same mark and revision keeps its number, any change gets a new
// one, and an unsettled snapshot none.
func TestRuntimeCacheNumbers(t *testing.T) {
	ctx := context.Background()
	src := &fakeSource{}
	c := newRuntimeCache(src, time.Second)
	now := time.Unix(1000, 0)
	c.now = func() time.Time { return now }
	gen := func(rev uint64) uint64 {
		t.Helper()
		_, g, err := c.get(ctx, mark(0), rev)
		if err != nil {
			t.Fatal(err)
		}
		return g
	}
	src.set("Halted", 10, true, 7)
	first := gen(7)
	if first == 0 || gen(7) != first {
		t.Fatalf("kept snapshot numbered %d, then %d", first, gen(7))
	}
	now = now.Add(2 * time.Second) // too old: taken again, same mark and revision
	if g := gen(7); g != first || src.asked != 2 {
		t.Fatalf("same snapshot taken again: number %d (was %d), %d asked", g, first, src.asked)
	}
	src.set("Running", 11, true, 7)
	c.heardOf(mark(11))
	second := gen(7)
	if second == 0 || second == first {
		t.Fatalf("changed runtime kept number %d", second)
	}
	src.set("Transient", 12, false, 7)
	c.heardOf(mark(12))
	if g := gen(7); g != 0 {
		t.Fatalf("unsettled snapshot numbered %d", g)
	}
}

// A client that misses readAheadAfter GetAll replies at one revision and snapshot
// starts one read-ahead of the others; fewer misses, an older revision, or a snapshot
// not kept start none, and a new revision counts again from zero.
func TestReplyCacheReadsAheadOncePerRevision(t *testing.T) {
	var c replyCache
	for i := 1; i < readAheadAfter; i++ {
		if c.missed(5, 1) {
			t.Fatalf("read-ahead after %d misses", i)
		}
	}
	if !c.missed(5, 1) {
		t.Fatalf("no read-ahead after %d misses", readAheadAfter)
	}
	if c.missed(5, 1) || c.missed(5, 1) {
		t.Fatal("a second read-ahead at the same revision")
	}
	if c.missed(4, 9) || c.missed(5, 0) || !c.current(5, 1) {
		t.Fatal("an older revision or an unkept snapshot counted")
	}
	for i := 1; i < readAheadAfter; i++ {
		if c.missed(6, 1) {
			t.Fatalf("revision 6: read-ahead after %d misses", i)
		}
	}
	if c.current(5, 1) || !c.missed(6, 1) {
		t.Fatal("revision 6 did not start its own read-ahead")
	}
}
