package storage

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/micro"

	"github.com/qubesbus/qubesbus/bus/envelope"
	"github.com/qubesbus/qubesbus/bus/rpc"
	storageapi "github.com/qubesbus/qubesbus/schemas/storage"
)

// TestSimStoreCompareAndSet: two stores of one host (two instances) change one
// simulated volume at once; every change lands once (compare-and-set, retried on
// the other's value), and after Sync both read the same record.
func TestSimStoreCompareAndSet(t *testing.T) {
	a, ns := testSimStore(t, nil)
	b, _ := testSimStore(t, ns)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	const each = 20
	var wg sync.WaitGroup
	errs := make(chan error, 2*each)
	for _, st := range []*simStore{a, b} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range each {
				errs <- st.change(ctx, "thin", "appvms/q/private", func(cur *simRecord) (*simRecord, error) {
					r := orNew(cur, Volume{Size: 1 << 20})
					r.Revs = append(r.Revs, Revision{ID: "r"})
					r.Next++
					return r, nil
				})
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	for name, st := range map[string]*simStore{"a": a, "b": b} {
		if err := st.Sync(ctx); err != nil {
			t.Fatal(err)
		}
		r, _ := st.get("thin", "appvms/q/private")
		if r == nil || r.Next != 1+2*each || len(r.Revs) != 2*each {
			if r != nil {
				t.Fatalf("store %s: %d changes, %d revisions, want %d", name, r.Next-1, len(r.Revs), 2*each)
			}
			t.Fatalf("store %s: no record", name)
		}
	}
	// A removal through one is seen through the other; removing again is a no-op.
	gone := func(*simRecord) (*simRecord, error) { return nil, nil }
	if err := a.change(ctx, "thin", "appvms/q/private", gone); err != nil {
		t.Fatal(err)
	}
	if err := b.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if r, _ := b.get("thin", "appvms/q/private"); r != nil {
		t.Fatalf("removed volume still read through b: %+v", r)
	}
	if err := b.change(ctx, "thin", "appvms/q/private", gone); err != nil {
		t.Fatal(err)
	}
	// Another host's volumes share the bucket, not the view: its writes move the
	// sequence a Sync waits for (the watcher follows the whole bucket) and are skipped.
	other, _ := testSimStoreOf(t, ns, "g")
	if err := other.change(ctx, "thin", "appvms/q/private", func(*simRecord) (*simRecord, error) {
		return &simRecord{Size: 7, Next: 1}, nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := b.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if r, _ := b.get("thin", "appvms/q/private"); r != nil {
		t.Fatalf("host g's volume read through host h: %+v", r)
	}
	// Keys hold any pool name and vid.
	for _, k := range [][2]string{{"a.b", "x/../y"}, {"p", ""}, {"-", "a b\n"}} {
		if p, v, hashed, ok := parseSimKey("h.", simKey("h.", k[0], k[1])); !ok || hashed || p != k[0] || v != k[1] {
			t.Fatalf("key of %q %q reads back as %q %q %v %v", k[0], k[1], p, v, hashed, ok)
		}
	}
}

// TestSimStoreLongNames: a pool named with 60 KiB (qubesd sets no limit) keeps its
// volumes like any other: the key stays far below the NATS protocol line limit (the
// name is hashed in it), a write answers at once, another instance reads it (a
// running one after Sync, a new one at start) and sees its removal.
func TestSimStoreLongNames(t *testing.T) {
	a, ns := testSimStore(t, nil)
	b, _ := testSimStore(t, ns)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	pool := strings.Repeat("p", 60<<10)
	vid := "vg/" + strings.Repeat("v", 60<<10)
	for _, k := range [][2]string{{pool, "appvms/q/private"}, {"thin", vid}, {pool, vid}} {
		if key := simKey("h.", k[0], k[1]); len(key) > 2+2*maxSimKeyPart+1 {
			t.Fatalf("key of %d bytes", len(key))
		}
		if _, _, hashed, ok := parseSimKey("h.", simKey("h.", k[0], k[1])); !ok || !hashed {
			t.Fatalf("a long name's key: hashed %v, ok %v", hashed, ok)
		}
	}
	if simKey("h.", pool, "x") == simKey("h.", pool+"q", "x") {
		t.Fatal("two long pool names share a key")
	}
	wctx, wcancel := context.WithTimeout(ctx, 5*time.Second) // an overlong key would hang until this
	defer wcancel()
	if err := a.change(wctx, pool, vid, func(cur *simRecord) (*simRecord, error) {
		return orNew(cur, Volume{Size: 1 << 20}), nil
	}); err != nil {
		t.Fatalf("write of a long-named pool's volume: %v", err)
	}
	if err := b.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if r, _ := b.get(pool, vid); r == nil || r.Pool != pool || r.VID != vid {
		t.Fatal("the long-named pool's volume not read through another instance")
	}
	c, _ := testSimStore(t, ns)
	if r, _ := c.get(pool, vid); r == nil {
		t.Fatal("the long-named pool's volume not loaded by a new instance")
	}
	if err := a.change(ctx, pool, vid, func(*simRecord) (*simRecord, error) { return nil, nil }); err != nil {
		t.Fatal(err)
	}
	for name, st := range map[string]*simStore{"b": b, "c": c} {
		if err := st.Sync(ctx); err != nil {
			t.Fatal(err)
		}
		if r, _ := st.get(pool, vid); r != nil {
			t.Fatalf("store %s still reads the removed volume", name)
		}
	}
}

// instance is one storage instance of the harness's host, its Service reachable
// for calls aimed at it.
type instance struct {
	s      *Service
	svc    micro.Service
	cancel context.CancelFunc
}

func (h *harness) instance(t *testing.T) *instance {
	t.Helper()
	stamp := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	s, err := New(Config{Host: h.Subjects, Root: h.root, Stamp: &stamp, Lifecycle: halted{},
		StatFS: func(string) (int64, int64, error) { return 100 << 30, 20 << 30, nil }})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(h.Ctx)
	nc := h.Connect()
	svc, err := s.Serve(ctx, nc)
	if err != nil {
		t.Fatal(err)
	}
	in := &instance{s: s, svc: svc, cancel: cancel}
	t.Cleanup(in.close)
	return in
}

// close stops the instance as a process exit would: endpoints, watchers, connection.
func (in *instance) close() {
	_ = in.svc.Stop()
	in.cancel()
}

// call serves a volume call on this instance (not whichever the queue group picks).
func (in *instance) call(t *testing.T, h func(*Service) rpc.Handler, qube, arg, payload string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := h(in.s)(ctx, &rpc.Call{Dest: rpc.Ref{Name: qube}, Arg: arg, Payload: []byte(payload)})
	if err != nil {
		t.Fatalf("call on %s %s: %v", qube, arg, err)
	}
	return string(out)
}

func info(s *Service) rpc.Handler      { return s.volumeInfo }
func snapshots(s *Service) rpc.Handler { return s.volumeListSnapshots }
func resize(s *Service) rpc.Handler    { return s.volumeResize }
func revert(s *Service) rpc.Handler    { return s.volumeRevert }

// TestTwoInstancesShareSimulatedVolumes: a simulated volume created, resized,
// committed and reverted through one instance reads the same through the other.
func TestTwoInstancesShareSimulatedVolumes(t *testing.T) {
	h := newHarness(t)
	a, b := h.instance(t), h.instance(t)
	inThinPool(t, h, "work")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	same := func(what string, f func(*Service) rpc.Handler) string {
		t.Helper()
		ga, gb := a.call(t, f, "work", "private", ""), b.call(t, f, "work", "private", "")
		if ga != gb {
			t.Fatalf("%s differs:\nthrough a:\n%s\nthrough b:\n%s", what, ga, gb)
		}
		return ga
	}

	a.call(t, resize, "work", "private", "4294967296")
	if got := same("info after a resize through a", info); !strings.Contains(got, "size=4294967296\n") {
		t.Fatalf("info after resize:\n%s", got)
	}
	// Two commits through a (start, stop), then a revert through b.
	for range 2 {
		if err := a.s.prepareVolumes(ctx, storageapi.VolumesRequest{Qube: "work"}); err != nil {
			t.Fatal(err)
		}
		if err := a.s.followPower(ctx, "work", false); err != nil {
			t.Fatal(err)
		}
	}
	revs := same("snapshots after two commits through a", snapshots)
	if revs == "" {
		t.Fatal("no revision after two commits")
	}
	oldest, _, _ := strings.Cut(revs, "\n")
	b.call(t, revert, "work", "private", oldest)
	if got := same("snapshots after a revert through b", snapshots); got == revs || strings.Contains(got, oldest+"\n") {
		t.Fatalf("snapshots after reverting %s through b: %q (were %q)", oldest, got, revs)
	}
	same("info after a revert through b", info)
}

// TestInstanceClosedMidway: a volume started through instance a stays dirty when a
// goes away; b commits it on the stop and serves every call after.
func TestInstanceClosedMidway(t *testing.T) {
	h := newHarness(t)
	a, b := h.instance(t), h.instance(t)
	inThinPool(t, h, "work")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	before := b.call(t, snapshots, "work", "private", "")
	if err := a.s.prepareVolumes(ctx, storageapi.VolumesRequest{Qube: "work"}); err != nil {
		t.Fatal(err)
	}
	a.close()

	if err := b.s.syncSim(ctx); err != nil {
		t.Fatal(err)
	}
	q, err := b.s.qubeVolumes("work")
	if err != nil {
		t.Fatal(err)
	}
	_, v, _ := q.volume(&rpc.Call{Dest: rpc.Ref{Name: "work"}, Arg: "private"})
	p, err := b.s.poolOf(q.pools, v)
	if err != nil {
		t.Fatal(err)
	}
	if !p.IsDirty(v) {
		t.Fatal("a volume started through a is not dirty through b")
	}
	if err := b.s.followPower(ctx, "work", false); err != nil {
		t.Fatal(err)
	}
	after := b.call(t, snapshots, "work", "private", "")
	if after == before || after == "" {
		t.Fatalf("snapshots %q after a stop through b (were %q): no commit", after, before)
	}
	// Calls through the bus reach b alone now.
	wantOK(t, h.Call("", "admin.vm.volume.Resize", "work", "private", []byte("8589934592")), "")
	if got := infoOf(t, h, "work"); !strings.Contains(got, "size=8589934592\n") {
		t.Fatalf("info after a resize served by b:\n%s", got)
	}
	if r := h.Call("", "admin.vm.volume.ListSnapshots", "work", "private", nil); r.Status != envelope.StatusOK || string(r.Content) != after {
		t.Fatalf("snapshots through the bus %q, want %q", r.Content, after)
	}
}

// FuzzSimKey: any pool name and vid make a key that is a valid key-value key, stays
// within the bound, and reads back as the names (or, hashed, as no names).
func FuzzSimKey(f *testing.F) {
	f.Add("thin", "appvms/q/private")
	f.Add("", "")
	f.Add("a.b", "x/../y")
	f.Add(strings.Repeat("p", 200), "v")
	f.Add("=", "_")
	f.Fuzz(func(t *testing.T, pool, vid string) {
		key := simKey("h.", pool, vid)
		if len(key) > len("h.")+2*maxSimKeyPart+1 {
			t.Fatalf("key of %d bytes", len(key))
		}
		for _, c := range []byte(key) {
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("-/_=.", c) >= 0) {
				t.Fatalf("key %q holds %q", key, c)
			}
		}
		if strings.Count(key, ".") != 2 {
			t.Fatalf("key %q is not three tokens", key)
		}
		p, v, hashed, ok := parseSimKey("h.", key)
		if !ok || (!hashed && (p != pool || v != vid)) {
			t.Fatalf("key %q reads back as %q %q hashed %v ok %v", key, p, v, hashed, ok)
		}
		if want := simKeyPart(pool)[0] == '=' || simKeyPart(vid)[0] == '='; hashed != want {
			t.Fatalf("key %q: hashed %v", key, hashed)
		}
	})
}
