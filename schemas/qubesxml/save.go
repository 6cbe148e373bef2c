package qubesxml

import (
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"sync"

	"github.com/qubesbus/qubesbus/schemas/config"
)

// Save writes c to path atomically, as qubesd does: a temporary file in the same
// directory (qubes.xml~‹random›) is written, made mode 0660 group qubes, synced and
// renamed over path, then the directory is synced. Locking is the caller's job.
func Save(path string, c *config.Config) error {
	b, err := Marshal(c) // before touching the disk: a bad value writes nothing
	if err != nil {
		return err
	}
	return WriteFile(path, b)
}

// WriteFile replaces path with b the way Save does (for callers that need the encoded
// bytes themselves, e.g. to hash them).
func WriteFile(path string, b []byte) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, filepath.Base(path)+"~*")
	if err != nil {
		return fmt.Errorf("save %s: %w", filepath.Base(path), err)
	}
	if err := writeTemp(f, b); err != nil {
		f.Close()
		os.Remove(f.Name())
		return fmt.Errorf("save %s: %w", filepath.Base(path), err)
	}
	if err := os.Rename(f.Name(), path); err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("save %s: %w", filepath.Base(path), err)
	}
	// The rename is durable only once the directory entry is on disk.
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("save %s: %w", filepath.Base(path), err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("save %s: sync directory: %w", filepath.Base(path), err)
	}
	return nil
}

// writeTemp fills and closes the temporary file; its mode is set explicitly
// because CreateTemp uses 0600 and the umask must not matter.
func writeTemp(f *os.File, b []byte) error {
	if _, err := f.Write(b); err != nil {
		return err
	}
	if err := f.Chmod(0o660); err != nil {
		return err
	}
	if err := chownQubes(f); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return err
	}
	return f.Close()
}

// chownQubes gives the file to group qubes; like qubesd it skips this when the
// group cannot be found.
func chownQubes(f *os.File) error {
	gid, err := qubesGID()
	if err != nil || gid < 0 {
		return err
	}
	return f.Chown(-1, gid)
}

// qubesGID looks the group up once per process (-1: none): a save must not read
// /etc/group every time.
var qubesGID = sync.OnceValues(func() (int, error) {
	g, err := user.LookupGroup("qubes")
	if err != nil {
		return -1, nil
	}
	gid, err := strconv.Atoi(g.Gid)
	if err != nil {
		return -1, fmt.Errorf("group qubes: bad gid %q", g.Gid)
	}
	return gid, nil
})
