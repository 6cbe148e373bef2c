package storage

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/qubesbus/qubesbus/bus/qerr"
)

// fileDriver keeps volumes as sparse image files under the pool's dir_path, in
// qubesd's file-reflink layout: <vid>.img (the committed data), <vid>-dirty.img (while
// the qube runs), <vid>.img.<n>@<mtime>Z (revisions). Copies are reflinks (FICLONE)
// where the filesystem supports them and sparse copies where it does not. The
// "file" driver uses the same layout (its Info path differs from qubesd's file driver:
// see the package notes).
type fileDriver struct{ name string }

func (d fileDriver) Name() string { return d.name }

func (d fileDriver) Params() []Param {
	if d.name == "file" {
		return []Param{{"revisions_to_keep", false}, {"dir_path", true}, {"ephemeral_volatile", false}}
	}
	return []Param{{"revisions_to_keep", false}, {"dir_path", true}, {"setup_check", false}, {"ephemeral_volatile", false}}
}

func (d fileDriver) Open(cfg PoolConfig, host Host) (Pool, error) {
	p := &filePool{driver: d.name, host: host, rtk: "1", ephemeral: false}
	p.name, _ = cfg.Get("name")
	dir, ok := cfg.Get("dir_path")
	if !ok {
		return nil, fmt.Errorf("%w: no dir_path", ErrBadOption)
	}
	// qubesd keeps os.path.abspath(dir_path) (normpath for "file"); qubesd runs in /.
	if !filepath.IsAbs(dir) {
		dir = "/" + dir
	}
	p.dir = filepath.Clean(dir)
	if v, ok := cfg.Get("revisions_to_keep"); ok {
		p.rtk = v // kept as given, as qubesd does
	}
	if v, ok := cfg.Get("ephemeral_volatile"); ok {
		b, err := parseBool(v)
		if err != nil {
			return nil, fmt.Errorf("%w: ephemeral_volatile=%q", ErrBadOption, v)
		}
		p.ephemeral = b
	}
	if v, ok := cfg.Get("setup_check"); ok {
		if _, err := parseBool(v); err != nil {
			return nil, fmt.Errorf("%w: setup_check=%q", ErrBadOption, v)
		}
	}
	return p, nil
}

type filePool struct {
	driver    string
	name      string
	dir       string // as configured (absolute, clean)
	rtk       string
	ephemeral bool
	host      Host
}

var _ Pool = (*filePool)(nil)

func (p *filePool) Config() PoolConfig {
	return PoolConfig{{"name", p.name}, {"dir_path", p.dir}, {"driver", p.driver},
		{"revisions_to_keep", p.rtk}, {"ephemeral_volatile", pyBool(p.ephemeral)}}
}

// local maps a configured path onto the host's root.
func (p *filePool) local(path string) string {
	if p.host.Root == "" {
		return path
	}
	return filepath.Join(p.host.Root, path)
}

func (p *filePool) DirPath() string  { return p.dir }
func (p *filePool) Listed() []string { return nil }

func (p *filePool) Setup(context.Context) error {
	for _, sub := range []string{"", "appvms", "vm-templates"} {
		if err := os.MkdirAll(p.local(filepath.Join(p.dir, sub)), 0o755); err != nil {
			return fmt.Errorf("pool %s: %w", p.name, err)
		}
	}
	return nil
}

func (p *filePool) Destroy(context.Context) error { return nil }

func (p *filePool) Usage() (int64, int64, bool) {
	stat := p.host.StatFS
	if stat == nil {
		stat = statFS
	}
	size, used, err := stat(p.local(p.dir))
	if err != nil {
		return 0, 0, false
	}
	return size, used, true
}

// statFS reads the filesystem's size and usage (statvfs, as qubesd).
func statFS(path string) (int64, int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return 0, 0, err
	}
	fr := int64(st.Frsize)
	if fr == 0 {
		fr = int64(st.Bsize)
	}
	return fr * int64(st.Blocks), fr * int64(st.Blocks-st.Bfree), nil
}

// The files of a volume.
func (p *filePool) base(v Volume) string  { return p.local(filepath.Join(p.dir, v.VID)) }
func (p *filePool) clean(v Volume) string { return p.base(v) + ".img" }
func (p *filePool) dirty(v Volume) string { return p.base(v) + "-dirty.img" }
func (p *filePool) imp(v Volume) string   { return p.base(v) + "-import.img" }
func (p *filePool) revPath(v Volume, r Revision) string {
	return p.clean(v) + "." + r.ID + "@" + isodate(r.Time) + "Z"
}

// isodate is qubesd's storage.isodate of whole seconds, in UTC.
func isodate(t time.Time) string { return t.UTC().Truncate(time.Second).Format("2006-01-02T15:04:05") }

// Path is what Info reports: reflink.py's running copy; file.py's image, which for a
// snapshot is its source's (FileVolume.path).
func (p *filePool) Path(v Volume) string {
	if p.driver == "file" {
		if v.SnapOnStart && v.Source != "" {
			return filepath.Join(p.dir, v.Source) + ".img"
		}
		return filepath.Join(p.dir, v.VID) + ".img"
	}
	return filepath.Join(p.dir, v.VID) + "-dirty.img"
}

func (p *filePool) ExportPath(v Volume) (string, bool) {
	if !v.SaveOnStop {
		return "", false
	}
	return p.clean(v), true
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

func (p *filePool) Size(v Volume) int64 {
	for _, f := range []string{p.dirty(v), p.clean(v)} {
		if st, err := os.Stat(f); err == nil {
			return st.Size()
		}
	}
	return v.Size
}

func (p *filePool) UsageOf(v Volume) int64 {
	for _, f := range []string{p.dirty(v), p.clean(v)} {
		if st, err := os.Stat(f); err == nil {
			if sys, ok := st.Sys().(*syscall.Stat_t); ok {
				return sys.Blocks * 512
			}
			return 0
		}
	}
	return 0
}

func (p *filePool) Revisions(v Volume) ([]Revision, error) {
	prefix := p.clean(v) + "."
	matches, err := filepath.Glob(globEscape(prefix) + "*?@????-??-??T??:??:??Z")
	if err != nil {
		return nil, err
	}
	var out []Revision
	for _, m := range matches {
		id, ts, ok := strings.Cut(strings.TrimSuffix(m[len(prefix):], "Z"), "@")
		if !ok {
			continue
		}
		if _, err := strconv.Atoi(id); err != nil {
			continue
		}
		t, err := time.ParseInLocation("2006-01-02T15:04:05", ts, time.UTC)
		if err != nil {
			continue
		}
		out = append(out, Revision{ID: id, Time: t})
	}
	slices.SortFunc(out, func(a, b Revision) int {
		x, _ := strconv.Atoi(a.ID)
		y, _ := strconv.Atoi(b.ID)
		return x - y
	})
	return out, nil
}

func globEscape(s string) string {
	r := strings.NewReplacer(`\`, `\\`, "*", `\*`, "?", `\?`, "[", `\[`)
	return r.Replace(s)
}

func (p *filePool) IsOutdated(v Volume, src *Source) bool {
	if !v.SnapOnStart || src == nil {
		return false
	}
	sp, ok := src.Pool.(*filePool)
	if !ok {
		return false
	}
	a, err1 := os.Stat(sp.clean(src.Volume))
	b, err2 := os.Stat(p.clean(v))
	if err1 != nil || err2 != nil {
		return false
	}
	return !os.SameFile(a, b)
}

// stamp sets a written file's mtime on a simulated host.
func (p *filePool) stamp(path string) error {
	if p.host.Stamp == nil {
		return nil
	}
	return os.Chtimes(path, *p.host.Stamp, *p.host.Stamp)
}

// sparse creates (replaces) an empty sparse file of size bytes.
func (p *filePool) sparse(path string, size int64) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	tmp := path + "~new"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		os.Remove(tmp)
		return err
	}
	if err := f.Close(); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := p.stamp(tmp); err != nil {
		os.Remove(tmp)
		return err
	}
	return os.Rename(tmp, path)
}

// ensureClean creates the committed image of a save_on_stop volume that has none yet
// (a qube of the fixture): empty, of its configured size.
func (p *filePool) ensureClean(v Volume) error {
	if exists(p.clean(v)) {
		return nil
	}
	return p.sparse(p.clean(v), v.Size)
}

func (p *filePool) Create(_ context.Context, v Volume) error {
	if err := p.removeAll(v); err != nil {
		return err
	}
	if v.SaveOnStop && !v.SnapOnStart {
		return p.sparse(p.clean(v), v.Size)
	}
	return nil
}

func (p *filePool) removeAll(v Volume) error {
	revs, err := p.Revisions(v)
	if err != nil {
		return err
	}
	files := []string{p.imp(v), p.clean(v), p.dirty(v)}
	for _, r := range revs {
		files = append(files, p.revPath(v, r))
	}
	for _, f := range files {
		if err := os.Remove(f); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	return nil
}

func (p *filePool) Remove(_ context.Context, v Volume) error {
	if err := p.removeAll(v); err != nil {
		return err
	}
	_ = os.Remove(filepath.Dir(p.base(v))) // only if empty, as qubesd
	return nil
}

// Resize follows qubesd's drivers, whether the qube runs or not (the image a running
// qube uses is resized in place; qubesd also resizes its loop device, which a host
// without Xen does not have). file (file.py FileVolume.resize) refuses read-only and
// snap_on_start volumes with its own texts (the missing space is qubesd's);
// file-reflink (reflink.py) refuses read-only ones only.
func (p *filePool) Resize(_ context.Context, v Volume, size int64) error {
	if p.driver == "file" {
		if !v.RW {
			return qerr.StoragePoolException("Can not resize readonly volume " + v.VID)
		}
		if v.SnapOnStart {
			return qerr.StoragePoolException("Cannot resize volume based on a template - resizethe template instead")
		}
	}
	if !v.RW {
		return qerr.StoragePoolException("Cannot resize: " + v.VID + " is read-only")
	}
	if exists(p.dirty(v)) {
		return p.truncate(p.dirty(v), size)
	}
	if v.SaveOnStop && !v.SnapOnStart {
		if err := p.ensureClean(v); err != nil {
			return err
		}
		return p.truncate(p.clean(v), size)
	}
	return nil // applies at the next start (the configured size)
}

func (p *filePool) truncate(path string, size int64) error {
	if err := os.Truncate(path, size); err != nil {
		return err
	}
	return p.stamp(path)
}

// addRevision keeps the committed image as the next revision, named after its mtime.
func (p *filePool) addRevision(v Volume) error {
	if v.RevisionsToKeep == 0 {
		return nil
	}
	if err := p.ensureClean(v); err != nil {
		return err
	}
	st, err := os.Stat(p.clean(v))
	if err != nil {
		return err
	}
	revs, err := p.Revisions(v)
	if err != nil {
		return err
	}
	next := "1"
	if len(revs) > 0 {
		n, _ := strconv.Atoi(revs[len(revs)-1].ID)
		next = strconv.Itoa(n + 1)
	}
	return p.copyFile(p.clean(v), p.revPath(v, Revision{ID: next, Time: st.ModTime()}), -1)
}

// prune drops the oldest revisions beyond keep (qubesd's slice [:-keep or None]).
func (p *filePool) prune(v Volume, keep int) error {
	revs, err := p.Revisions(v)
	if err != nil {
		return err
	}
	drop := revs
	if keep != 0 {
		n := len(revs) - keep
		if keep < 0 {
			n = min(-keep, len(revs))
		}
		drop = revs[:max(n, 0)]
	}
	for _, r := range drop {
		if err := os.Remove(p.revPath(v, r)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	return nil
}

func (p *filePool) commit(v Volume, from string) error {
	if err := p.addRevision(v); err != nil {
		return err
	}
	if err := p.prune(v, v.RevisionsToKeep); err != nil {
		return err
	}
	return os.Rename(from, p.clean(v))
}

func (p *filePool) Revert(_ context.Context, v Volume, revision string) error {
	if exists(p.dirty(v)) {
		return qerr.StoragePoolException("Cannot revert: " + v.VID + " is not cleanly stopped")
	}
	revs, err := p.Revisions(v)
	if err != nil {
		return err
	}
	i := slices.IndexFunc(revs, func(r Revision) bool { return r.ID == revision })
	if i < 0 {
		return fmt.Errorf("%w: %s", ErrNoRevision, revision)
	}
	if err := p.addRevision(v); err != nil {
		return err
	}
	return os.Rename(p.revPath(v, revs[i]), p.clean(v))
}

func (p *filePool) Import(_ context.Context, v Volume, src *Source) error {
	if !v.SaveOnStop {
		return nil
	}
	if ex, ok := src.Pool.(exporter); ok {
		path, ok := ex.ExportPath(src.Volume)
		if !ok {
			return fmt.Errorf("%w: export of %s (not save_on_stop)", ErrNotSupported, src.Volume.VID)
		}
		if !exists(path) {
			// A source never written reads as empty.
			if err := p.sparse(p.imp(v), src.Pool.Size(src.Volume)); err != nil {
				return err
			}
		} else if err := p.copyFile(path, p.imp(v), -1); err != nil {
			return err
		}
	} else if err := p.sparse(p.imp(v), src.Pool.Size(src.Volume)); err != nil {
		return err
	}
	return p.commit(v, p.imp(v))
}

func (p *filePool) Clear(_ context.Context, v Volume) error {
	if !v.SaveOnStop {
		return fmt.Errorf("%w: import_data of %s (not save_on_stop)", ErrNotSupported, v.VID)
	}
	if err := p.sparse(p.imp(v), p.Size(v)); err != nil {
		return err
	}
	return p.commit(v, p.imp(v))
}

// missing reports whether an image was written once and is gone: its file is absent
// while its directory exists (a qube of the fixture whose data was never written
// has neither).
func missing(local string) bool {
	return !exists(local) && exists(filepath.Dir(local))
}

// Verify follows qubesd's drivers. file-reflink (reflink.py ReflinkVolume.verify):
// the source's committed image for snap_on_start, the volume's own for save_on_stop,
// "Missing image file '<path>' for volume <vid>". file (file.py FileVolume.verify):
// its path (the source's image for snap_on_start) when snap_on_start or save_on_stop,
// "Missing image file: <path>.".
func (p *filePool) Verify(v Volume, src *Source) error {
	if !v.SnapOnStart && !v.SaveOnStop {
		return nil
	}
	if p.driver == "file" {
		vid := v.VID
		if v.SnapOnStart {
			if src == nil {
				return nil
			}
			vid = src.Volume.VID
		}
		path := filepath.Join(p.dir, vid) + ".img" // as qubesd names it (not under Root)
		if !missing(p.local(path)) {
			return nil
		}
		return qerr.StoragePoolException("Missing image file: " + path + ".")
	}
	pool, vol := p, v
	if v.SnapOnStart {
		sp, ok := srcFilePool(src)
		if !ok {
			return nil // no image to look at (qubesd fails elsewhere)
		}
		pool, vol = sp, src.Volume
	}
	if !missing(pool.clean(vol)) {
		return nil
	}
	path := filepath.Join(pool.dir, vol.VID) + ".img"
	return qerr.StoragePoolException("Missing image file " + qerr.Repr(path) + " for volume " + v.VID)
}

func srcFilePool(src *Source) (*filePool, bool) {
	if src == nil {
		return nil, false
	}
	sp, ok := src.Pool.(*filePool)
	return sp, ok
}

func (p *filePool) Start(_ context.Context, v Volume, src *Source) error {
	_ = os.Remove(p.imp(v))
	isDirty := v.SaveOnStop && exists(p.dirty(v))
	switch {
	case v.RevisionsToKeep == -1:
		if err := p.prune(v, 0); err != nil {
			return err
		}
		if !isDirty && v.SaveOnStop {
			if err := p.ensureClean(v); err != nil {
				return err
			}
			return os.Rename(p.clean(v), p.dirty(v))
		}
	case isDirty:
	case v.SnapOnStart:
		if src == nil {
			return qerr.StoragePoolException("Missing source volume for " + v.VID)
		}
		sp, ok := src.Pool.(*filePool)
		if !ok {
			return p.sparse(p.dirty(v), v.Size)
		}
		if err := sp.ensureClean(src.Volume); err != nil {
			return err
		}
		_ = os.Remove(p.clean(v))
		if err := os.MkdirAll(filepath.Dir(p.clean(v)), 0o755); err != nil {
			return err
		}
		if err := os.Link(sp.clean(src.Volume), p.clean(v)); err != nil {
			return err
		}
		return p.copyFile(p.clean(v), p.dirty(v), -1)
	case v.SaveOnStop:
		if err := p.ensureClean(v); err != nil {
			return err
		}
		return p.copyFile(p.clean(v), p.dirty(v), -1)
	default:
		return p.sparse(p.dirty(v), v.Size)
	}
	return nil
}

func (p *filePool) Stop(_ context.Context, v Volume) error {
	switch {
	case v.SaveOnStop && exists(p.dirty(v)):
		if v.RevisionsToKeep == -1 {
			return os.Rename(p.dirty(v), p.clean(v))
		}
		return p.commit(v, p.dirty(v))
	case !v.SaveOnStop:
		for _, f := range []string{p.dirty(v), p.clean(v)} {
			if err := os.Remove(f); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return err
			}
		}
	}
	return nil
}

func (p *filePool) IsDirty(v Volume) bool { return v.SaveOnStop && exists(p.dirty(v)) }

func (p *filePool) Discard(_ context.Context, v Volume) error {
	if v.SaveOnStop && v.RevisionsToKeep == -1 && exists(p.dirty(v)) {
		return os.Rename(p.dirty(v), p.clean(v)) // Start moved the data aside
	}
	files := []string{p.dirty(v)}
	if !v.SaveOnStop {
		files = append(files, p.clean(v)) // a snapshot's link to its source
	}
	for _, f := range files {
		if err := os.Remove(f); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	return nil
}

// copyFile writes a copy of src at dst (replacing it): a reflink where the filesystem
// can, else a sparse copy; size >= 0 resizes the copy.
func (p *filePool) copyFile(src, dst string, size int64) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	tmp := dst + "~new"
	out, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	cerr := cloneOrCopy(in, out)
	if cerr == nil && size >= 0 {
		cerr = out.Truncate(size)
	}
	if err := out.Close(); cerr == nil {
		cerr = err
	}
	if cerr == nil {
		cerr = p.stamp(tmp)
	}
	if cerr != nil {
		os.Remove(tmp)
		return cerr
	}
	return os.Rename(tmp, dst)
}

// cloneOrCopy shares src's extents with dst (FICLONE) or copies its data regions.
func cloneOrCopy(src, dst *os.File) error {
	err := unix.IoctlFileClone(int(dst.Fd()), int(src.Fd()))
	if err == nil {
		return nil
	}
	if !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.EXDEV) && !errors.Is(err, unix.EINVAL) &&
		!errors.Is(err, unix.EBADF) && !errors.Is(err, unix.ENOTTY) && !errors.Is(err, unix.ENOSYS) {
		return fmt.Errorf("reflink: %w", err)
	}
	return sparseCopy(src, dst)
}

// sparseCopy copies only the data regions of src (SEEK_DATA/SEEK_HOLE), leaving holes.
func sparseCopy(src, dst *os.File) error {
	st, err := src.Stat()
	if err != nil {
		return err
	}
	size := st.Size()
	if err := dst.Truncate(size); err != nil {
		return err
	}
	var off int64
	for off < size {
		data, err := unix.Seek(int(src.Fd()), off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // only a hole is left
		}
		if err != nil {
			// No SEEK_DATA here: copy everything (a dense copy, still correct).
			data = off
		}
		hole, err := unix.Seek(int(src.Fd()), data, unix.SEEK_HOLE)
		if err != nil {
			hole = size
		}
		if _, err := src.Seek(data, io.SeekStart); err != nil {
			return err
		}
		if _, err := dst.Seek(data, io.SeekStart); err != nil {
			return err
		}
		if _, err := io.CopyN(dst, src, hole-data); err != nil {
			return err
		}
		off = hole
	}
	return nil
}
