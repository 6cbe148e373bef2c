package storage

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	storageapi "github.com/qubesbus/qubesbus/schemas/storage"
)

// A backup reads the committed image of a file pool's volume: its data regions and
// their bytes; a volume never written exports as holes of its configured size.
func TestExportVolume(t *testing.T) {
	h := newHarness(t)
	h.start(t)
	img := filepath.Join(h.root, "var/lib/qubes/appvms/work/private.img")
	if err := os.MkdirAll(filepath.Dir(img), 0o755); err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("qubes!"), 1000)
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(data, 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(4 << 20); err != nil {
		t.Fatal(err)
	}
	f.Close()
	c := storageapi.Client{NC: h.Connect(), Host: h.Subjects}

	rep, err := c.ExportVolume(h.Ctx, "work", "private")
	if err != nil {
		t.Fatal(err)
	}
	size, ext := rep.Size, rep.Extents
	if rep.Usage == 0 {
		t.Error("usage 0 of an image with data")
	}
	if size != 4<<20 || len(ext) == 0 {
		t.Fatalf("size %d extents %v", size, ext)
	}
	var covered int64
	for _, e := range ext {
		if e.Offset <= 1<<20 && e.Offset+e.Length >= 1<<20+int64(len(data)) {
			covered++
		}
	}
	if covered != 1 {
		t.Errorf("extents %v do not cover the data at 1 MiB", ext)
	}
	buf := make([]byte, len(data))
	if n, err := c.ReadVolume(h.Ctx, "work", "private", buf, 1<<20); err != nil || n != len(data) || !bytes.Equal(buf, data) {
		t.Fatalf("read %d %v, data equal %v", n, err, bytes.Equal(buf, data))
	}

	rep, err = c.ExportVolume(h.Ctx, "personal", "private")
	if err != nil || rep.Size != 2147483648 || len(rep.Extents) != 0 || rep.Usage != 0 {
		t.Fatalf("unwritten volume: %+v err %v", rep, err)
	}
	if _, err := c.ExportVolume(h.Ctx, "work", "nosuch"); err == nil {
		t.Fatal("export of a missing volume succeeded")
	}
}
