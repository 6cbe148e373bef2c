package storage

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/sys/unix"

	"github.com/qubesbus/qubesbus/bus/envelope"
	"github.com/qubesbus/qubesbus/internal/testhost"
	"github.com/qubesbus/qubesbus/schemas/config"
	"github.com/qubesbus/qubesbus/schemas/qubesxml"
)

// seedWith writes the fixture plus extra AppVMs shaped as qubesd writes them (as the
// lab's generator in cmd/qubesbus/internal/lab does) and returns the file.
func seedWith(b *testing.B, extra int) string { return seedIn(b, extra, "varlibqubes") }

// seedIn is seedWith with the extra qubes' private and volatile volumes in pool (a
// pool other than varlibqubes is added as a simulated lvm_thin pool).
func seedIn(b *testing.B, extra int, pool string) string {
	b.Helper()
	c, err := qubesxml.Load(testhost.Fixture)
	if err != nil {
		b.Fatal(err)
	}
	maxQID := 0
	for i := range c.Domains {
		if q, ok := c.Domains[i].Property("qid"); ok {
			if n, _ := strconv.Atoi(q); n > maxQID {
				maxQID = n
			}
		}
	}
	for i := range extra {
		name := fmt.Sprintf("scale-%04d", i+1)
		qid := strconv.Itoa(maxQID + 1 + i)
		vols := []Volume{
			{Name: "root", Pool: "varlibqubes", VID: "appvms/" + name + "/root", RevisionsToKeep: 1, RW: true, SnapOnStart: true, Size: 10 << 30, Source: "vm-templates/fedora-41/root"},
			{Name: "private", Pool: pool, VID: "appvms/" + name + "/private", RevisionsToKeep: 1, RW: true, SaveOnStop: true, Size: 2 << 30},
			{Name: "volatile", Pool: pool, VID: "appvms/" + name + "/volatile", RevisionsToKeep: 1, RW: true, Size: 10 << 30},
			{Name: "kernel", Pool: "linux-kernel", VID: "6.12.40-1.fc41"},
		}
		c.Domains = append(c.Domains, config.Domain{ID: "domain-" + qid, Class: "AppVM",
			Properties: []config.Property{{Name: "label", Value: "gray"}, {Name: "name", Value: name}, {Name: "qid", Value: qid},
				{Name: "uuid", Value: fmt.Sprintf("00000000-0000-4000-8000-%012d", i)}, {Name: "template", Value: "fedora-41"}},
			VolumeConfig: renderVolumeConfig(vols)})
	}
	if pool != "varlibqubes" {
		c.Pools = append(c.Pools, config.Pool{Attrs: []config.Attr{{Name: "driver", Value: "lvm_thin"}, {Name: "name", Value: pool},
			{Name: "thin_pool", Value: "vm-pool"}, {Name: "volume_group", Value: "qubes_dom0"}}})
	}
	path := filepath.Join(b.TempDir(), "qubes.xml")
	data, err := qubesxml.Marshal(c)
	if err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile(path, data, 0o600); err != nil {
		b.Fatal(err)
	}
	return path
}

// BenchmarkVolumeReads: admin.vm.volume.List and Info (of a snapshot, whose
// is_outdated looks its source up, and of a private volume) over NATS against hosts of
// 9, 1 009 and 9 999 qubes: they should stay flat.
func BenchmarkVolumeReads(b *testing.B) {
	for _, extra := range []int{0, 1000, 9990} {
		seed := seedWith(b, extra)
		h := &harness{Host: testhost.Start(b, seed), root: b.TempDir()}
		stamp := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
		s, err := New(Config{Host: h.Subjects, Root: h.root, Stamp: &stamp, Lifecycle: halted{},
			StatFS: func(string) (int64, int64, error) { return 100 << 30, 20 << 30, nil }})
		if err != nil {
			b.Fatal(err)
		}
		svc, err := s.Serve(h.Ctx, h.Connect())
		if err != nil {
			b.Fatal(err)
		}
		qube := "work"
		if extra > 0 {
			qube = fmt.Sprintf("scale-%04d", extra/2)
		}
		qubes := 9 + extra
		for _, c := range []struct{ name, method, arg string }{
			{"List", "admin.vm.volume.List", ""},
			{"Info-root", "admin.vm.volume.Info", "root"},
			{"Info-private", "admin.vm.volume.Info", "private"},
		} {
			b.Run(fmt.Sprintf("qubes=%d/%s", qubes, c.name), func(b *testing.B) {
				b.ReportAllocs()
				for b.Loop() {
					if r := h.Call("", c.method, qube, c.arg, nil); r.Status != envelope.StatusOK {
						b.Fatalf("%s: %s %+v", c.method, r.Status, r.Exception)
					}
				}
			})
		}
		_ = svc.Stop()
	}
}

// BenchmarkClone10GiB copies a 10 GiB sparse image holding 256 MiB of data, as a
// clone does: by reflink where the filesystem has it (FICLONE), else by a copy of
// the data regions only (what cloneOrCopy falls back to), against a plain copy of
// every byte. The reflink metric says which the filesystem under the test's temp dir
// allowed.
func BenchmarkClone10GiB(b *testing.B) {
	dir := b.TempDir()
	src := filepath.Join(dir, "src.img")
	f, err := os.Create(src)
	if err != nil {
		b.Fatal(err)
	}
	if err := f.Truncate(10 << 30); err != nil {
		b.Fatal(err)
	}
	chunk := make([]byte, 4<<20)
	for i := range chunk {
		chunk[i] = byte(i)
	}
	for i := range int64(64) { // 64 × 4 MiB spread over the image
		if _, err := f.WriteAt(chunk, i*(160<<20)); err != nil {
			b.Fatal(err)
		}
	}
	if err := f.Sync(); err != nil {
		b.Fatal(err)
	}
	f.Close()
	copyWith := func(b *testing.B, do func(in, out *os.File) error) {
		for b.Loop() {
			in, err := os.Open(src)
			if err != nil {
				b.Fatal(err)
			}
			dst := filepath.Join(dir, "dst.img")
			out, err := os.Create(dst)
			if err != nil {
				b.Fatal(err)
			}
			if err := do(in, out); err != nil {
				b.Fatal(err)
			}
			if err := out.Sync(); err != nil {
				b.Fatal(err)
			}
			in.Close()
			out.Close()
			b.StopTimer()
			os.Remove(dst)
			b.StartTimer()
		}
	}
	b.Run("clone", func(b *testing.B) {
		reflink := 0.0
		copyWith(b, func(in, out *os.File) error {
			if unix.IoctlFileClone(int(out.Fd()), int(in.Fd())) == nil {
				reflink = 1
				return nil
			}
			return cloneOrCopy(in, out)
		})
		b.ReportMetric(reflink, "reflink")
	})
	b.Run("plain-copy", func(b *testing.B) {
		buf := make([]byte, 1<<20)
		copyWith(b, func(in, out *os.File) error {
			_, err := io.CopyBuffer(struct{ io.Writer }{out}, struct{ io.Reader }{in}, buf)
			return err
		})
	})
}

// BenchmarkSimVolumeReads: the same reads with the qubes' private and volatile volumes
// in a simulated lvm_thin pool whose every volume has a record in QUBES_SIMPOOLS (one
// KV entry each, 20 000 for 9 999 qubes), plus the pool's Info (its usage sums the
// cached records). Each read waits for the bucket once (one request) and reads the
// watcher's cache, so they should stay flat but for Info-pool, linear in memory.
func BenchmarkSimVolumeReads(b *testing.B) {
	for _, extra := range []int{10, 9990} {
		seed := seedIn(b, extra, "thin")
		h := &harness{Host: testhost.Start(b, seed), root: b.TempDir()}
		nc := h.Connect()
		js, err := jetstream.New(nc)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := OpenSimBucket(h.Ctx, js, 1, nil); err != nil {
			b.Fatal(err)
		}
		stored := func() {
			select {
			case <-js.PublishAsyncComplete():
			case <-time.After(time.Minute):
				b.Fatal("records not stored")
			}
		}
		for i := range extra {
			if i%1000 == 999 {
				stored() // bounded in flight
			}
			for _, vol := range []string{"private", "volatile"} {
				vid := fmt.Sprintf("appvms/scale-%04d/%s", i+1, vol)
				data, _ := json.Marshal(simRecord{Pool: "thin", VID: vid, Size: 2 << 30, Next: 1})
				if _, err := js.PublishAsync("$KV."+SimBucket+"."+simKey(h.Subjects.ID()+".", "thin", vid), data); err != nil {
					b.Fatal(err)
				}
			}
		}
		stored()
		stamp := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
		s, err := New(Config{Host: h.Subjects, Root: h.root, Stamp: &stamp, Lifecycle: halted{},
			StatFS: func(string) (int64, int64, error) { return 100 << 30, 20 << 30, nil }})
		if err != nil {
			b.Fatal(err)
		}
		svc, err := s.Serve(h.Ctx, h.Connect())
		if err != nil {
			b.Fatal(err)
		}
		qube := fmt.Sprintf("scale-%04d", extra/2)
		for _, c := range []struct{ name, method, dest, arg string }{
			{"List", "admin.vm.volume.List", qube, ""},
			{"Info-private", "admin.vm.volume.Info", qube, "private"},
			{"Info-pool", "admin.pool.Info", "dom0", "thin"},
		} {
			b.Run(fmt.Sprintf("qubes=%d/%s", 9+extra, c.name), func(b *testing.B) {
				b.ReportAllocs()
				for b.Loop() {
					if r := h.Call("", c.method, c.dest, c.arg, nil); r.Status != envelope.StatusOK {
						b.Fatalf("%s: %s %+v", c.method, r.Status, r.Exception)
					}
				}
			})
		}
		_ = svc.Stop()
	}
}
