// Package checkpoint keeps qubes.xml on disk together with the revision it holds.
//
// qubes.xml stays byte for byte in qubesd's format, so the revision is kept beside it in
// qubes.xml.rev: the revision, the change-log sequence of its record and the SHA-256 of
// the qubes.xml bytes, plus the same for the file being replaced. A write puts the new
// marker in place first and renames the new qubes.xml over the old one second (each a
// temporary file, fsync, rename, directory fsync). If the process dies between the two,
// the old file still matches the marker's "previous" entry; so Load always knows which
// revision the file on disk holds, and a file that matches neither entry was changed by
// someone else.
//
// Every load and write holds an exclusive flock on qubes.xml.lock, so processes sharing
// the directory (persistence instances of one host) never write at the same time and
// never read half a write. The lock is taken per operation, not for the process
// lifetime, so a standby instance in the same directory can write when it takes over.
package checkpoint

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/qubesbus/qubesbus/schemas/config"
	"github.com/qubesbus/qubesbus/schemas/qubesxml"
)

// File is a qubes.xml with its marker (path + ".rev") and lock (path + ".lock").
type File struct{ path string }

// New returns the checkpoint whose qubes.xml is at path.
func New(path string) File { return File{path: path} }

// Path is the qubes.xml path.
func (f File) Path() string { return f.path }

func (f File) markerPath() string { return f.path + ".rev" }
func (f File) lockPath() string   { return f.path + ".lock" }

// Mark says which revision a qubes.xml holds. The zero Mark (Revision 0) means unknown:
// a file without a marker, such as a seed or one written by qubesd.
type Mark struct {
	Revision uint64 `json:"revision"`
	Sequence uint64 `json:"sequence"` // change-log sequence of the revision's record
	SHA256   string `json:"sha256"`   // of the qubes.xml bytes, hex
}

// marker is the content of qubes.xml.rev.
type marker struct {
	Mark
	Previous *Mark `json:"previous,omitempty"` // the file this one replaced
}

// Errors of Load.
var (
	ErrMissing     = errors.New("qubes XML store is missing")
	ErrForeignEdit = errors.New("qubes.xml does not match its revision marker")
)

// Load reads qubes.xml and the mark of the revision it holds. A missing qubes.xml is
// first created from seed, if one is given. A malformed file is left as it is and the
// error names it and the line (a *qubesxml.SyntaxError).
func (f File) Load(seed string) (*config.Config, Mark, error) {
	unlock, err := f.lock()
	if err != nil {
		return nil, Mark{}, err
	}
	defer unlock()
	data, err := os.ReadFile(f.path)
	if errors.Is(err, fs.ErrNotExist) {
		if seed == "" {
			return nil, Mark{}, fmt.Errorf("%w: %s: %w", ErrMissing, f.path, err)
		}
		return f.seed(seed)
	}
	if err != nil {
		return nil, Mark{}, fmt.Errorf("load qubes.xml: %w", err)
	}
	c, err := qubesxml.Parse(data, f.path)
	if err != nil {
		return nil, Mark{}, err
	}
	if err := f.readFirewalls(c); err != nil {
		return nil, Mark{}, err
	}
	m, err := f.readMarker()
	if err != nil || m == nil {
		return c, Mark{}, err
	}
	switch sum := digest(data); {
	case sum == m.SHA256:
		return c, m.Mark, nil
	case m.Previous != nil && sum == m.Previous.SHA256:
		return c, *m.Previous, nil
	}
	return nil, Mark{}, fmt.Errorf("%w: %s was changed outside qubesbus (it is not revision %d of %s); "+
		"to discard that change, remove %s and the service rebuilds qubes.xml from its change log",
		ErrForeignEdit, f.path, m.Revision, f.markerPath(), f.path)
}

// seed creates qubes.xml from a seed file, which must parse; the seed is not changed.
// Called with the lock held.
func (f File) seed(seed string) (*config.Config, Mark, error) {
	data, err := os.ReadFile(seed)
	if err != nil {
		return nil, Mark{}, fmt.Errorf("seed qubes.xml: %w", err)
	}
	c, err := qubesxml.Parse(data, seed)
	if err != nil {
		return nil, Mark{}, fmt.Errorf("seed qubes.xml: %w", err)
	}
	// A marker without its file describes nothing.
	if err := os.Remove(f.markerPath()); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, Mark{}, fmt.Errorf("seed qubes.xml: %w", err)
	}
	if err := qubesxml.WriteFile(f.path, data); err != nil {
		return nil, Mark{}, fmt.Errorf("seed qubes.xml: %w", err)
	}
	return c, Mark{}, nil
}

// WriteResult says what Write did.
type WriteResult struct {
	Written bool // false: the file already held this revision or a later one
	// Foreign is set when the replaced file matched no marker entry: someone else had
	// changed it, and that change is now overwritten.
	Foreign bool
}

// Write replaces qubes.xml with c, which is the configuration at m.Revision (m.SHA256
// is computed here). It writes nothing if the file on disk already holds that revision
// or a later one, written by another instance sharing the directory. Revisions are
// one history (the change log's), so a later revision includes every earlier one.
func (f File) Write(c *config.Config, m Mark) (WriteResult, error) {
	b, err := qubesxml.Marshal(c) // before the lock: encoding 1000 qubes takes a while
	if err != nil {
		return WriteResult{}, err
	}
	m.SHA256 = digest(b)
	unlock, err := f.lock()
	if err != nil {
		return WriteResult{}, err
	}
	defer unlock()
	cur, err := f.readMarker()
	if err != nil {
		return WriteResult{}, err
	}
	prev, foreign, err := f.describeCurrent(cur)
	if err != nil {
		return WriteResult{}, err
	}
	if prev != nil && prev.Revision >= m.Revision {
		return WriteResult{}, nil
	}
	if err := f.writeFirewalls(c); err != nil {
		return WriteResult{}, err
	}
	if err := f.writeMarker(marker{Mark: m, Previous: prev}); err != nil {
		return WriteResult{}, err
	}
	if err := qubesxml.WriteFile(f.path, b); err != nil {
		return WriteResult{}, err
	}
	return WriteResult{Written: true, Foreign: foreign}, nil
}

// Adopt records that the qubes.xml on disk holds m.Revision, without rewriting it (when
// a change log is started from the file as it is).
func (f File) Adopt(m Mark) error {
	unlock, err := f.lock()
	if err != nil {
		return err
	}
	defer unlock()
	data, err := os.ReadFile(f.path)
	if err != nil {
		return fmt.Errorf("adopt qubes.xml: %w", err)
	}
	m.SHA256 = digest(data)
	return f.writeMarker(marker{Mark: m})
}

// describeCurrent returns the mark of the qubes.xml now on disk (the marker's current
// or previous entry, whichever the bytes match; nil if there is no file).
func (f File) describeCurrent(cur *marker) (prev *Mark, foreign bool, err error) {
	data, err := os.ReadFile(f.path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("read qubes.xml: %w", err)
	}
	sum := digest(data)
	switch {
	case cur == nil:
		return &Mark{SHA256: sum}, false, nil
	case sum == cur.SHA256:
		return &cur.Mark, false, nil
	case cur.Previous != nil && sum == cur.Previous.SHA256:
		return cur.Previous, false, nil
	}
	return &Mark{SHA256: sum}, true, nil
}

func (f File) readMarker() (*marker, error) {
	b, err := os.ReadFile(f.markerPath())
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read revision marker: %w", err)
	}
	var m marker
	if err := json.Unmarshal(b, &m); err != nil || m.SHA256 == "" {
		if err == nil {
			err = errors.New("no sha256")
		}
		return nil, fmt.Errorf("%s: corrupt revision marker (remove it to rebuild qubes.xml from the change log): %w", f.markerPath(), err)
	}
	return &m, nil
}

func (f File) writeMarker(m marker) error {
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	if err := qubesxml.WriteFile(f.markerPath(), append(b, '\n')); err != nil {
		return fmt.Errorf("write revision marker: %w", err)
	}
	return nil
}

func digest(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// Firewall rules are not part of qubes.xml: as in dom0, each qube that has rules keeps
// them in a firewall.xml of its own, here <dir of qubes.xml>/firewall/<qube>.xml. Write
// puts them in place before the marker and qubes.xml, each file atomically. A crash
// in between leaves files newer than qubes.xml; that is harmless, because recovery
// replays the change log from the revision qubes.xml holds, and every firewall change
// carries the qube's whole firewall.xml.

func (f File) firewallDir() string { return filepath.Join(filepath.Dir(f.path), "firewall") }

// firewallFile is a qube's firewall.xml; false for a name that is no plain file name.
func (f File) firewallFile(name string) (string, bool) {
	if name == "" || name != filepath.Base(name) || strings.HasPrefix(name, ".") {
		return "", false
	}
	return filepath.Join(f.firewallDir(), name+".xml"), true
}

// readFirewalls fills in the firewall.xml of every qube that has one.
func (f File) readFirewalls(c *config.Config) error {
	for i := range c.Domains {
		d := &c.Domains[i]
		path, ok := f.firewallFile(d.Name())
		if !ok {
			continue
		}
		b, err := os.ReadFile(path)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("load firewall of %s: %w", d.Name(), err)
		}
		d.Firewall = string(b)
	}
	return nil
}

// writeFirewalls writes the firewall.xml of every qube that has rules, where it
// differs from the file on disk, and removes the files of qubes that have none or are
// gone. Called with the lock held.
func (f File) writeFirewalls(c *config.Config) error {
	keep := map[string]bool{}
	for i := range c.Domains {
		d := &c.Domains[i]
		path, ok := f.firewallFile(d.Name())
		if !ok || d.Firewall == "" {
			continue
		}
		keep[filepath.Base(path)] = true
		if cur, err := os.ReadFile(path); err == nil && string(cur) == d.Firewall {
			continue
		}
		if err := os.MkdirAll(f.firewallDir(), 0o770); err != nil {
			return fmt.Errorf("firewall dir: %w", err)
		}
		if err := qubesxml.WriteFile(path, []byte(d.Firewall)); err != nil {
			return fmt.Errorf("write firewall of %s: %w", d.Name(), err)
		}
	}
	entries, err := os.ReadDir(f.firewallDir())
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("firewall dir: %w", err)
	}
	for _, e := range entries {
		if strings.HasSuffix(e.Name(), ".xml") && !keep[e.Name()] {
			if err := os.Remove(filepath.Join(f.firewallDir(), e.Name())); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("remove firewall file: %w", err)
			}
		}
	}
	return nil
}
