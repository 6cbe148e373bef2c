package storage

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/bus/qerr"
	"github.com/qubesbus/qubesbus/schemas/config"
)

// testSimStore opens the simulated volumes' store of host "h" on a JetStream server
// (ns: nil starts one).
func testSimStore(t *testing.T, ns *server.Server) (*simStore, *server.Server) {
	t.Helper()
	return testSimStoreOf(t, ns, "h")
}

// testSimStoreOf is testSimStore for the given host.
func testSimStoreOf(t *testing.T, ns *server.Server, host string) (*simStore, *server.Server) {
	t.Helper()
	if ns == nil {
		ns = bustest.RunJetStream(t)
	}
	nc := bustest.Connect(t, ns)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	kv, err := OpenSimBucket(ctx, js, 1, nil)
	if err != nil {
		t.Fatal(err)
	}
	st, err := openSimStore(ctx, nc, kv, host, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	return st, ns
}

// testPool opens a pool of each writable driver on a temporary root; the simulated
// ones keep their volumes in a JetStream KV bucket, as in a service.
func testPools(t *testing.T) map[string]Pool {
	t.Helper()
	stamp := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	sim, _ := testSimStore(t, nil)
	host := Host{Root: t.TempDir(), Stamp: &stamp, sim: sim,
		StatFS: func(string) (int64, int64, error) { return 100 << 30, 20 << 30, nil }}
	out := map[string]Pool{}
	for _, cfg := range []PoolConfig{
		{{"name", "p-file"}, {"driver", "file"}, {"dir_path", "/var/lib/qubes/p-file"}},
		{{"name", "p-reflink"}, {"driver", "file-reflink"}, {"dir_path", "/var/lib/qubes/p-reflink"}},
		{{"name", "p-lvm"}, {"driver", "lvm_thin"}, {"volume_group", "vg"}, {"thin_pool", "tp"}},
		{{"name", "p-zfs"}, {"driver", "zfs"}, {"container", "tank"}},
	} {
		drvName, _ := cfg.Get("driver")
		d, ok := driverByName(drvName)
		if !ok {
			t.Fatalf("no driver %s", drvName)
		}
		p, err := d.Open(cfg, host)
		if err != nil {
			t.Fatal(err)
		}
		if err := p.Setup(context.Background()); err != nil {
			t.Fatal(err)
		}
		out[drvName] = p
	}
	return out
}

func revIDs(t *testing.T, p Pool, v Volume) []string {
	t.Helper()
	revs, err := p.Revisions(v)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, r := range revs {
		ids = append(ids, r.ID)
	}
	return ids
}

// TestDriverConformance is the one suite every writable pool driver passes: the
// volume life cycle qubesd's API drives (create, resize, start/stop commits with
// revisions, revert, clone, clear, remove).
func TestDriverConformance(t *testing.T) {
	ctx := context.Background()
	for name, p := range testPools(t) {
		t.Run(name, func(t *testing.T) {
			priv := Volume{Name: "private", Pool: "p", VID: "appvms/q/private", RevisionsToKeep: 2, RW: true, SaveOnStop: true, Size: 1 << 20}
			if err := p.Create(ctx, priv); err != nil {
				t.Fatal(err)
			}
			if got := p.Size(priv); got != 1<<20 {
				t.Fatalf("size %d after create, want %d", got, 1<<20)
			}
			if ids := revIDs(t, p, priv); len(ids) != 0 {
				t.Fatalf("revisions %v after create, want none", ids)
			}
			// A resize may grow or shrink (qubesd's raw Resize shrinks).
			for _, size := range []int64{3 << 20, 2 << 20} {
				if err := p.Resize(ctx, priv, size); err != nil {
					t.Fatal(err)
				}
				if got := p.Size(priv); got != size {
					t.Fatalf("size %d after resize, want %d", got, size)
				}
			}
			ro := priv
			ro.RW = false
			// Read-only volumes are refused, except by zfs (zfs.py checks nothing).
			if err := p.Resize(ctx, ro, 5<<20); (err == nil) != (name == "zfs") {
				t.Fatalf("resize of a read-only volume: %v", err)
			}
			if name == "zfs" {
				if err := p.Resize(ctx, priv, 2<<20); err != nil {
					t.Fatal(err)
				}
			}
			// Each start/stop commits one revision; only revisions_to_keep stay.
			for range 3 {
				if err := p.Start(ctx, priv, nil); err != nil {
					t.Fatal(err)
				}
				if err := p.Stop(ctx, priv); err != nil {
					t.Fatal(err)
				}
			}
			ids := revIDs(t, p, priv)
			if !slices.Equal(ids, []string{"2", "3"}) {
				t.Fatalf("revisions %v after three stops keeping 2, want [2 3]", ids)
			}
			if err := p.Revert(ctx, priv, "nosuch"); !errors.Is(err, ErrNoRevision) {
				t.Fatalf("revert to an unknown revision: %v, want ErrNoRevision", err)
			}
			if got := revIDs(t, p, priv); !slices.Equal(got, ids) {
				t.Fatalf("a refused revert changed the revisions: %v", got)
			}
			if err := p.Revert(ctx, priv, "2"); err != nil {
				t.Fatal(err)
			}
			if got := revIDs(t, p, priv); slices.Contains(got, "2") || len(got) != 2 {
				t.Fatalf("revisions %v after revert to 2: want 2 consumed and the current data kept", got)
			}
			// A clone takes the source's data and size, committed as after a stop.
			dst := Volume{Name: "private", Pool: "p", VID: "appvms/clone/private", RevisionsToKeep: 1, RW: true, SaveOnStop: true, Size: 1 << 20}
			if err := p.Create(ctx, dst); err != nil {
				t.Fatal(err)
			}
			if err := p.Import(ctx, dst, &Source{Volume: priv, Pool: p}); err != nil {
				t.Fatal(err)
			}
			if got, want := p.Size(dst), p.Size(priv); got != want {
				t.Fatalf("clone size %d, want the source's %d", got, want)
			}
			if got := revIDs(t, p, dst); !slices.Equal(got, []string{"1"}) {
				t.Fatalf("clone revisions %v, want [1]", got)
			}
			if err := p.Clear(ctx, dst); err != nil {
				t.Fatal(err)
			}
			// revisions_to_keep 0 keeps none.
			none := Volume{Name: "private", Pool: "p", VID: "appvms/none/private", RW: true, SaveOnStop: true, Size: 1 << 20}
			if err := p.Create(ctx, none); err != nil {
				t.Fatal(err)
			}
			_ = p.Start(ctx, none, nil)
			_ = p.Stop(ctx, none)
			if got := revIDs(t, p, none); len(got) != 0 {
				t.Fatalf("revisions %v with revisions_to_keep 0", got)
			}
			// A volatile volume is not saved and cannot be cleared.
			vol := Volume{Name: "volatile", Pool: "p", VID: "appvms/q/volatile", RevisionsToKeep: 1, RW: true, Size: 1 << 20}
			if err := p.Create(ctx, vol); err != nil {
				t.Fatal(err)
			}
			if err := p.Clear(ctx, vol); !errors.Is(err, ErrNotSupported) {
				t.Fatalf("clear of a volatile volume: %v, want ErrNotSupported", err)
			}
			// A start is dirty until its stop; a discarded start leaves the committed
			// data and revisions as they were, for every kind of volume.
			if p.IsDirty(priv) {
				t.Fatal("a stopped volume is dirty")
			}
			revsBefore, sizeBefore := revIDs(t, p, priv), p.Size(priv)
			if err := p.Start(ctx, priv, nil); err != nil {
				t.Fatal(err)
			}
			if !p.IsDirty(priv) {
				t.Fatal("a started save_on_stop volume is not dirty")
			}
			if err := p.Discard(ctx, priv); err != nil {
				t.Fatal(err)
			}
			if p.IsDirty(priv) || !slices.Equal(revIDs(t, p, priv), revsBefore) || p.Size(priv) != sizeBefore {
				t.Fatalf("after a discarded start: dirty %v, revisions %v (were %v), size %d (was %d)",
					p.IsDirty(priv), revIDs(t, p, priv), revsBefore, p.Size(priv), sizeBefore)
			}
			inPlace := priv
			inPlace.VID, inPlace.RevisionsToKeep = "appvms/inplace/private", -1
			if err := p.Create(ctx, inPlace); err != nil {
				t.Fatal(err)
			}
			if err := p.Start(ctx, inPlace, nil); err != nil {
				t.Fatal(err)
			}
			if err := p.Discard(ctx, inPlace); err != nil {
				t.Fatal(err)
			}
			if p.IsDirty(inPlace) || p.Size(inPlace) != inPlace.Size {
				t.Fatalf("a discarded start of a volume without snapshots: dirty %v, size %d", p.IsDirty(inPlace), p.Size(inPlace))
			}
			snap := Volume{Name: "root", Pool: "p", VID: "appvms/q/root", RW: true, SnapOnStart: true, Source: priv.VID, Size: 1 << 20}
			for _, v := range []Volume{snap, vol} {
				if err := p.Start(ctx, v, &Source{Volume: priv, Pool: p}); err != nil {
					t.Fatal(err)
				}
				if p.IsDirty(v) {
					t.Fatalf("%s: a volume that is not saved is dirty", v.Name)
				}
				if err := p.Discard(ctx, v); err != nil {
					t.Fatal(err)
				}
			}
			for _, v := range []Volume{priv, dst, none, vol, inPlace} {
				if err := p.Remove(ctx, v); err != nil {
					t.Fatal(err)
				}
				if got := revIDs(t, p, v); len(got) != 0 {
					t.Fatalf("revisions %v after remove", got)
				}
			}
		})
	}
}

// TestFilePoolSparseAndRevisionNames: images are sparse (usage 0 on a simulated host
// whose filesystem allocates lazily), revision files carry the image's mtime, and
// every file lives under the root-mapped dir_path.
func TestFilePoolSparseAndRevisionNames(t *testing.T) {
	ctx := context.Background()
	p := testPools(t)["file-reflink"].(*filePool)
	v := Volume{Name: "private", VID: "appvms/q/private", RevisionsToKeep: 1, RW: true, SaveOnStop: true, Size: 10 << 30}
	if err := p.Create(ctx, v); err != nil {
		t.Fatal(err)
	}
	if u := p.UsageOf(v); u != 0 {
		t.Fatalf("usage %d of an empty 10 GiB image, want 0 (sparse)", u)
	}
	if err := p.Start(ctx, v, nil); err != nil {
		t.Fatal(err)
	}
	if err := p.Stop(ctx, v); err != nil {
		t.Fatal(err)
	}
	want := filepath.Join(p.host.Root, "/var/lib/qubes/p-reflink/appvms/q/private.img.1@2025-01-01T00:00:00Z")
	if _, err := os.Stat(want); err != nil {
		t.Fatalf("revision file: %v", err)
	}
	if got := p.Path(v); got != "/var/lib/qubes/p-reflink/appvms/q/private-dirty.img" {
		t.Fatalf("path %q", got)
	}
}

// TestFileCopyKeepsData: a clone has the source's bytes and holes, by reflink or copy.
func TestFileCopyKeepsData(t *testing.T) {
	ctx := context.Background()
	p := testPools(t)["file"].(*filePool)
	src := Volume{Name: "private", VID: "appvms/a/private", RevisionsToKeep: 1, RW: true, SaveOnStop: true, Size: 8 << 20}
	dst := Volume{Name: "private", VID: "appvms/b/private", RevisionsToKeep: 1, RW: true, SaveOnStop: true, Size: 1 << 20}
	for _, v := range []Volume{src, dst} {
		if err := p.Create(ctx, v); err != nil {
			t.Fatal(err)
		}
	}
	f, err := os.OpenFile(p.clean(src), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("qubes"), 5<<20); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if err := p.Import(ctx, dst, &Source{Volume: src, Pool: p}); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(p.clean(dst))
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 8<<20 || string(got[5<<20:5<<20+5]) != "qubes" {
		t.Fatalf("clone is %d bytes, data %q", len(got), got[5<<20:5<<20+5])
	}
}

func TestVolumeConfigRoundTrip(t *testing.T) {
	raw := `<volume-config>
  <volume name="root" pool="varlibqubes" vid="appvms/work/root" revisions_to_keep="1" rw="True" save_on_stop="False" snap_on_start="True" size="10737418240" source="vm-templates/fedora-41/root"/>
  <volume name="volatile" pool="varlibqubes" vid="appvms/work/volatile" revisions_to_keep="1" rw="True" save_on_stop="False" snap_on_start="False" ephemeral="True" size="10737418240"/>
  <volume name="kernel" pool="linux-kernel" vid="6.12.40-1.fc41" revisions_to_keep="0" rw="False" save_on_stop="False" snap_on_start="False"/>
</volume-config>`
	vols, err := parseVolumeConfig(config.RawXML(raw))
	if err != nil {
		t.Fatal(err)
	}
	if got := string(renderVolumeConfig(vols)); got != raw {
		t.Fatalf("round trip:\n%s\nwant\n%s", got, raw)
	}
	if _, err := parseVolumeConfig(config.RawXML(`<volume-config><volume name="x" size="big"/></volume-config>`)); err == nil {
		t.Fatal("a size that is no number parsed")
	}
}

// TestVerifyMissingImage: every driver verifies what a start needs (qubesd's
// Volume.verify); the file drivers refuse an image that was written and is gone,
// with their qubesd texts, and take one never written (a fixture's qube) as empty.
func TestVerifyMissingImage(t *testing.T) {
	ctx := context.Background()
	for name, p := range testPools(t) {
		t.Run(name, func(t *testing.T) {
			tmpl := Volume{Name: "root", Pool: "p", VID: "vm-templates/t/root", RevisionsToKeep: 1, RW: true, SaveOnStop: true, Size: 1 << 20}
			root := Volume{Name: "root", Pool: "p", VID: "appvms/q/root", RW: true, SnapOnStart: true, Source: tmpl.VID, Size: 1 << 20}
			priv := Volume{Name: "private", Pool: "p", VID: "appvms/q/private", RevisionsToKeep: 1, RW: true, SaveOnStop: true, Size: 1 << 20}
			vol := Volume{Name: "volatile", Pool: "p", VID: "appvms/q/volatile", RW: true, Size: 1 << 20}
			src := &Source{Volume: tmpl, Pool: p}
			verify := func(v Volume, src *Source) error {
				t.Helper()
				err := p.Verify(v, src)
				var qe *qerr.Error
				if err != nil && (!errors.As(err, &qe) || qe.Class != "StoragePoolException") {
					t.Fatalf("verify %s: %v, want a StoragePoolException", v.VID, err)
				}
				return err
			}
			// Never written: nothing is missing.
			for _, v := range []Volume{root, priv, vol} {
				if err := verify(v, src); err != nil {
					t.Fatalf("verify %s before anything was written: %v", v.VID, err)
				}
			}
			for _, v := range []Volume{tmpl, priv} {
				if err := p.Create(ctx, v); err != nil {
					t.Fatal(err)
				}
			}
			for _, v := range []Volume{root, priv, vol} {
				if err := verify(v, src); err != nil {
					t.Fatalf("verify %s: %v", v.VID, err)
				}
			}
			fp, ok := p.(*filePool)
			if !ok {
				return // only a file pool's data can go missing behind its back
			}
			for _, v := range []Volume{tmpl, priv} {
				if err := os.Remove(fp.clean(v)); err != nil {
					t.Fatal(err)
				}
			}
			want := map[string][2]string{ // volume → file-reflink's text, file's text
				root.VID: {"Missing image file '/var/lib/qubes/p-reflink/vm-templates/t/root.img' for volume appvms/q/root",
					"Missing image file: /var/lib/qubes/p-file/vm-templates/t/root.img."},
				priv.VID: {"Missing image file '/var/lib/qubes/p-reflink/appvms/q/private.img' for volume appvms/q/private",
					"Missing image file: /var/lib/qubes/p-file/appvms/q/private.img."},
			}
			for _, v := range []Volume{root, priv} {
				w := want[v.VID][0]
				if name == "file" {
					w = want[v.VID][1]
				}
				if err := verify(v, src); err == nil || err.(*qerr.Error).Message != w {
					t.Errorf("verify %s: %v, want %q", v.VID, err, w)
				}
			}
			if err := verify(vol, src); err != nil {
				t.Errorf("verify of a volatile volume: %v", err)
			}
		})
	}
}

func TestVerifyKernel(t *testing.T) {
	root := t.TempDir()
	p, err := kernelDriver{}.Open(PoolConfig{{"name", "linux-kernel"}, {"dir_path", "/var/lib/qubes/vm-kernels"}, {"driver", "linux-kernel"}}, Host{Root: root})
	if err != nil {
		t.Fatal(err)
	}
	k := Volume{Name: "kernel", Pool: "linux-kernel", VID: "6.12.40-1.fc41"}
	if err := p.Verify(k, nil); err != nil {
		t.Fatalf("a kernel never installed: %v", err)
	}
	if err := os.MkdirAll(filepath.Join(root, "var/lib/qubes/vm-kernels", k.VID), 0o755); err != nil {
		t.Fatal(err)
	}
	var qe *qerr.Error
	if err := p.Verify(k, nil); !errors.As(err, &qe) || qe.Message != "Missing image file: /var/lib/qubes/vm-kernels/6.12.40-1.fc41/vmlinuz" {
		t.Fatalf("a kernel without vmlinuz: %v", err)
	}
	if err := os.WriteFile(filepath.Join(root, "var/lib/qubes/vm-kernels", k.VID, "vmlinuz"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := p.Verify(k, nil); err != nil {
		t.Fatalf("a kernel with vmlinuz: %v", err)
	}
	if err := p.Verify(Volume{Name: "kernel", Pool: "linux-kernel"}, nil); err != nil {
		t.Fatalf("no kernel: %v", err)
	}
}
