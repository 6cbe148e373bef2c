package qubesxml

import (
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"strconv"

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
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, filepath.Base(path)+"~*")
	if err != nil {
		return fmt.Errorf("save qubes.xml: %w", err)
	}
	if err := writeTemp(f, b); err != nil {
		f.Close()
		os.Remove(f.Name())
		return fmt.Errorf("save qubes.xml: %w", err)
	}
	if err := os.Rename(f.Name(), path); err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("save qubes.xml: %w", err)
	}
	// The rename is durable only once the directory entry is on disk.
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("save qubes.xml: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("save qubes.xml: sync directory: %w", err)
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
	g, err := user.LookupGroup("qubes")
	if err != nil {
		return nil
	}
	gid, err := strconv.Atoi(g.Gid)
	if err != nil {
		return fmt.Errorf("group qubes: bad gid %q", g.Gid)
	}
	return f.Chown(-1, gid)
}
