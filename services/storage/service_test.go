package storage

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/micro"

	"github.com/qubesbus/qubesbus/bus/envelope"
	"github.com/qubesbus/qubesbus/internal/testhost"
	"github.com/qubesbus/qubesbus/schemas/config"
)

type halted struct{}

func (halted) PowerStates(context.Context) (map[string]string, error) {
	return map[string]string{"dom0": "Running"}, nil
}

type harness struct {
	*testhost.Host
	root string
}

func newHarness(t *testing.T) *harness {
	t.Helper()
	h := &harness{Host: testhost.Start(t, ""), root: t.TempDir()}
	return h
}

// start runs one storage instance on its own connection.
func (h *harness) start(t *testing.T) micro.Service {
	t.Helper()
	return h.startWith(t, halted{})
}

// startWith runs one storage instance that takes power states from life.
func (h *harness) startWith(t *testing.T, life PowerStates) micro.Service {
	t.Helper()
	stamp := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	s, err := New(Config{Host: h.Subjects, Root: h.root, Stamp: &stamp, Lifecycle: life,
		StatFS: func(string) (int64, int64, error) { return 100 << 30, 20 << 30, nil }})
	if err != nil {
		t.Fatal(err)
	}
	svc, err := s.Serve(h.Ctx, h.Connect())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = svc.Stop() })
	return svc
}

func (h *harness) pools(t *testing.T) string {
	t.Helper()
	snap, err := h.Config().Snapshot(h.Ctx)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, p := range snap.Config.Pools {
		names = append(names, p.Name())
	}
	return strings.Join(names, " ")
}

func wantErr(t *testing.T, r envelope.Reply, class, msg string) {
	t.Helper()
	if r.Status != envelope.StatusException || r.Exception.Class != class || (msg != "" && r.Exception.Message != msg) {
		t.Fatalf("reply %s %+v, want %s %q", r.Status, r.Exception, class, msg)
	}
}

func wantOK(t *testing.T, r envelope.Reply, content string) {
	t.Helper()
	if r.Status != envelope.StatusOK || string(r.Content) != content {
		t.Fatalf("reply %s %q %+v, want ok %q", r.Status, r.Content, r.Exception, content)
	}
}

// TestPoolAddUntrusted: every refused admin.pool.Add answers qubesd's error and
// leaves the pools and the disk as they were.
func TestPoolAddUntrusted(t *testing.T) {
	h := newHarness(t)
	h.start(t)
	before := h.pools(t)
	for _, tc := range []struct {
		name, driver, payload, class, msg string
	}{
		{"unknown driver", "nosuch", "name=p\ndir_path=/x", "PermissionDenied", "Argument not in 'available drivers'"},
		{"non-ascii", "file", "name=p\ndir_path=/x\xc3\xa9", "ProtocolError", "Pool parameters contains non-ASCII characters"},
		{"no equals", "file", "name=p\ndir_path", "ProtocolError", "Options must be separated by equal sign"},
		{"empty line", "file", "name=p\n\ndir_path=/x", "ProtocolError", "Options must be separated by equal sign"},
		{"duplicate", "file", "name=p\nname=q\ndir_path=/x", "ProtocolError", "Options must be unique"},
		{"no name", "file", "dir_path=/x", "ProtocolError", "Pool configuration must contain key: name"},
		{"bad name", "file", "name=../etc\ndir_path=/x", "ProtocolError", "Pool name must be in safe set: abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_."},
		{"unknown option", "file", "name=p\ndir_path=/x\nsize=1", "ProtocolError", "Unexpected driver options found"},
		{"missing required", "lvm_thin", "name=p\nvolume_group=vg", "QubesException", "missing required driver options: thin_pool"},
		{"exists", "file", "name=varlibqubes\ndir_path=/x", "QubesPoolInUseError", "Storage pool is in use: 'varlibqubes'"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			wantErr(t, h.Call("", "admin.pool.Add", "dom0", tc.driver, []byte(tc.payload)), tc.class, tc.msg)
			if got := h.pools(t); got != before {
				t.Fatalf("pools %q after a refused add, want %q", got, before)
			}
			if _, err := os.Stat(filepath.Join(h.root, "x")); err == nil {
				t.Fatal("a refused add created its directory")
			}
		})
	}
	// A bad option value fails unhandled in qubesd (no answer): nothing is added.
	r := h.Call("", "admin.pool.Add", "dom0", "file", []byte("name=p\ndir_path=/x\nephemeral_volatile=maybe"))
	if r.Status != envelope.StatusAbort {
		t.Fatalf("bad ephemeral_volatile: %s, want abort", r.Status)
	}
	if got := h.pools(t); got != before {
		t.Fatalf("pools %q after an aborted add", got)
	}
}

// TestPoolLifecycle adds a pool (its directory under the root), sets its options,
// lists it and removes it; qubes.xml keeps it in qubesd's attribute order.
func TestPoolLifecycle(t *testing.T) {
	h := newHarness(t)
	h.start(t)
	wantOK(t, h.Call("", "admin.pool.Add", "dom0", "file", []byte("name=p1\ndir_path=/var/lib/qubes/p1/\nrevisions_to_keep=0\n")), "")
	if _, err := os.Stat(filepath.Join(h.root, "var/lib/qubes/p1/appvms")); err != nil {
		t.Fatalf("pool directory: %v", err)
	}
	wantOK(t, h.Call("", "admin.pool.Info", "dom0", "p1", nil),
		"dir_path=/var/lib/qubes/p1\ndriver=file\nephemeral_volatile=False\nname=p1\nrevisions_to_keep=0\nsize=107374182400\nusage=21474836480\nincluded_in=varlibqubes\n")
	wantOK(t, h.Call("", "admin.pool.Set.revisions_to_keep", "dom0", "p1", []byte("-1")), "")
	wantErr(t, h.Call("", "admin.pool.Set.revisions_to_keep", "dom0", "p1", []byte("-2")), "ProtocolError", "Value can't be lower than -1")
	wantErr(t, h.Call("", "admin.pool.Set.revisions_to_keep", "dom0", "p1", []byte("007")), "ProtocolError", "Revisions to keep contains spurious leading zeros")
	wantErr(t, h.Call("", "admin.pool.Set.ephemeral_volatile", "dom0", "p1", []byte("yes\xff")), "ProtocolError", "Payload is not boolean ASCII")
	wantOK(t, h.Call("", "admin.pool.Set.ephemeral_volatile", "dom0", "p1", []byte("on")), "")
	snap, err := h.Config().Snapshot(h.Ctx)
	if err != nil {
		t.Fatal(err)
	}
	i := snap.Config.PoolIndex("p1")
	if i < 0 {
		t.Fatal("p1 not in the configuration")
	}
	want := []config.Attr{{Name: "name", Value: "p1"}, {Name: "dir_path", Value: "/var/lib/qubes/p1"}, {Name: "driver", Value: "file"},
		{Name: "revisions_to_keep", Value: "-1"}, {Name: "ephemeral_volatile", Value: "True"}}
	if got := snap.Config.Pools[i].Attrs; !equalAttrs(got, want) {
		t.Fatalf("pool attrs %v, want %v", got, want)
	}
	wantErr(t, h.Call("", "admin.pool.Remove", "dom0", "linux-kernel", nil), "QubesPoolInUseError", "")
	wantOK(t, h.Call("", "admin.pool.Remove", "dom0", "p1", nil), "")
	wantErr(t, h.Call("", "admin.pool.Info", "dom0", "p1", nil), "PermissionDenied", "Argument not in 'pools'")
}

func equalAttrs(a, b []config.Attr) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TestVolumeUntrusted: malformed sizes, revision names and settings answer qubesd's
// errors and change nothing.
func TestVolumeUntrusted(t *testing.T) {
	h := newHarness(t)
	h.start(t)
	info := func() string {
		r := h.Call("", "admin.vm.volume.Info", "work", "private", nil)
		return string(r.Content)
	}
	before := info()
	for _, tc := range []struct {
		method, arg, payload, class, msg string
	}{
		{"admin.vm.volume.Resize", "private", "1e9", "ProtocolError", "Volume size contains non ASCII digits"},
		{"admin.vm.volume.Resize", "private", "-1", "ProtocolError", "Volume size contains non ASCII digits"},
		{"admin.vm.volume.Resize", "private", "01", "ProtocolError", "Volume size contains spurious leading zeros"},
		{"admin.vm.volume.Resize", "private", "99999999999999999999", "ProtocolError", "Volume size is bigger than 19 decimal digits"},
		{"admin.vm.volume.Resize", "nosuch", "1", "PermissionDenied", "Argument not in 'work volumes'"},
		{"admin.vm.volume.Revert", "private", "../../etc", "ProtocolError", "Revision name must be in safe set: abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:-_."},
		{"admin.vm.volume.Set.revisions_to_keep", "private", "-2", "QubesValueError", "Invalid value for revisions_to_keep"},
		{"admin.vm.volume.Set.rw", "private", "maybe", "ProtocolError", "Payload is not boolean ASCII"},
		{"admin.vm.volume.Set.ephemeral", "private", "True", "QubesValueError", "Cannot enable ephemeral on snap_on_start or save_on_stop or non-dom0 or not writable volume"},
		{"admin.vm.volume.CloneTo", "private", "notatoken", "QubesVolumeCopyTokenNotFoundError", "'Token to clone volume of qube was not found'"},
		{"admin.vm.volume.CloneTo", "private", "a.b>c*", "QubesVolumeCopyTokenNotFoundError", "'Token to clone volume of qube was not found'"},
		{"admin.vm.volume.CloneTo", "private", "t\xc3\xa9", "ProtocolError", "Token contains non-ASCII characters"},
	} {
		wantErr(t, h.Call("", tc.method, "work", tc.arg, []byte(tc.payload)), tc.class, tc.msg)
		if got := info(); got != before {
			t.Fatalf("%s %q changed the volume:\n%s\nwant\n%s", tc.method, tc.payload, got, before)
		}
	}
	// An unknown revision and a resize of the kernel fail unhandled, as in qubesd.
	for _, c := range [][2]string{{"admin.vm.volume.Revert", "private"}, {"admin.vm.volume.Resize", "kernel"}} {
		if r := h.Call("", c[0], "work", c[1], []byte("7")); r.Status != envelope.StatusAbort {
			t.Fatalf("%s %s: %s, want abort", c[0], c[1], r.Status)
		}
	}
	if got := info(); got != before {
		t.Fatalf("the aborted calls changed the volume")
	}
}

// TestCloneTokenAnyInstance: a token from CloneFrom works once, on another instance
// than the one that made it.
func TestCloneTokenAnyInstance(t *testing.T) {
	h := newHarness(t)
	a := h.start(t)
	wantOK(t, h.Call("", "admin.vm.volume.Resize", "work", "private", []byte("3221225472")), "")
	r := h.Call("", "admin.vm.volume.CloneFrom", "work", "private", nil)
	if r.Status != envelope.StatusOK || len(r.Content) != 32 {
		t.Fatalf("CloneFrom: %s %q", r.Status, r.Content)
	}
	token := r.Content
	h.start(t)
	if err := a.Stop(); err != nil {
		t.Fatal(err)
	}
	wantOK(t, h.Call("", "admin.vm.volume.CloneTo", "personal", "private", token), "")
	wantErr(t, h.Call("", "admin.vm.volume.CloneTo", "personal", "private", token),
		"QubesVolumeCopyTokenNotFoundError", "'Token to clone volume of qube was not found'")
	r = h.Call("", "admin.vm.volume.Info", "personal", "private", nil)
	if !strings.Contains(string(r.Content), "size=3221225472\n") {
		t.Fatalf("clone did not take the source's size:\n%s", r.Content)
	}
	wantOK(t, h.Call("", "admin.vm.volume.ListSnapshots", "personal", "private", nil), "1\n")
}
