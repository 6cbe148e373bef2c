package backup

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/qubesbus/qubesbus/bus/cloudevent"
	"github.com/qubesbus/qubesbus/bus/qerr"
	"github.com/qubesbus/qubesbus/schemas/config"
	"github.com/qubesbus/qubesbus/schemas/qubesxml"
	"github.com/qubesbus/qubesbus/services/backup/archive"
)

// job is one backup: the profile, the configuration it was planned on and the plan.
type job struct {
	profile    *Profile
	conf       *config.Config
	rev        uint64
	destVM     string // "": dom0, destination_path is a local path
	passphrase []byte
	plan       []Entry
	others     []string
	target     string // the archive's path, once write opened it
}

// files are the entries whose files go into the archive: every selected qube but
// dom0, whose home directory is not part of a qubesbus host.
func (j *job) files() []Entry {
	var out []Entry
	for _, e := range j.plan {
		if QID(e.Domain) != 0 {
			out = append(out, e)
		}
	}
	return out
}

// write is qubesd's Backup.backup_do up to the archive: the checks, the target, then
// the header, qubes.xml and every file. On any failure, a cancel included, the
// partial archive is removed.
func (s *Service) write(ctx context.Context, j *job) (err error) {
	now := s.cfg.Now()
	running, err := s.powerStates(ctx)
	if err != nil {
		return err
	}
	entries := j.files()
	for _, e := range entries {
		// A running qube whose volume is used in place (no snapshot) cannot be read
		// consistently.
		if !running(e.Domain.Name()) {
			continue
		}
		for _, v := range Volumes(e.Domain) {
			if v.SnapshotsDisabled() {
				return qerr.VMNotHaltedError("Domain is not powered off: " + qerr.Repr(e.Domain.Name()))
			}
		}
	}
	xmlData, err := backupXML(j.conf, entries)
	if err != nil {
		return fmt.Errorf("%w: %w", qerr.ErrAbort, err)
	}
	if j.target, err = s.targetPath(j, now); err != nil {
		return err
	}
	f, err := os.OpenFile(j.target, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return qerr.QubesException(fmt.Sprintf("Failed to open backup target %s: %v", j.target, err))
	}
	defer func() {
		if cerr := f.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("%w: close %s: %w", qerr.ErrAbort, j.target, cerr)
		}
		if err != nil {
			if rerr := os.Remove(j.target); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
				s.log.Error("remove a partial backup", "path", j.target, "err", rerr)
			}
		}
	}()
	out := bufio.NewWriterSize(f, 1<<20)
	w, err := archive.NewWriter(out, archive.Options{
		Passphrase: j.passphrase, BackupID: now.Format("20060102T150405") + "-" + strconv.Itoa(os.Getpid()),
		Compressed: j.profile.Compressed, CompressionFilter: j.profile.Filter,
		ChunkSize: s.cfg.ChunkSize, Scrypt: s.cfg.Scrypt, TempDir: s.cfg.TempDir, Now: s.cfg.Now,
	})
	if err != nil {
		return qerr.QubesException("Failed to create the backup: " + err.Error())
	}
	if err := w.WriteHeader(ctx); err != nil {
		return s.writeErr(ctx, err)
	}
	if err := w.AddFile(ctx, archive.File{Name: archive.QubesXMLName, Size: int64(len(xmlData)), ModTime: now,
		Data: bytes.NewReader(xmlData)}, nil); err != nil {
		return s.writeErr(ctx, err)
	}
	prog := s.newProgress(ctx, j)
	for _, e := range entries {
		name := e.Domain.Name()
		if len(e.Items) == 0 {
			// qubesd stores an empty file so that the qube's directory exists.
			if err := w.AddFile(ctx, archive.File{Name: e.Subdir + "empty", ModTime: now, Data: bytes.NewReader(nil)}, nil); err != nil {
				return s.writeErr(ctx, err)
			}
		}
		for _, it := range e.Items {
			file := archive.File{Name: e.Subdir + it.Name, ModTime: now}
			if it.Volume != nil {
				rep, err := s.vols.ExportVolume(ctx, name, it.Volume.Name)
				if err != nil {
					return s.writeErr(ctx, err)
				}
				file.Size = rep.Size
				file.Sparse = make([]archive.Extent, 0, len(rep.Extents))
				for _, x := range rep.Extents {
					file.Sparse = append(file.Sparse, archive.Extent{Offset: x.Offset, Length: x.Length})
				}
				file.SparseData = &volumeReader{ctx: ctx, vols: s.vols, qube: name, volume: it.Volume.Name}
			} else {
				file.Size, file.Data = int64(len(it.Data)), bytes.NewReader(it.Data)
			}
			if err := w.AddFile(ctx, file, prog.add); err != nil {
				return s.writeErr(ctx, err)
			}
		}
		prog.vmDone(e.Size())
	}
	if err := w.Close(); err != nil {
		return s.writeErr(ctx, err)
	}
	if err := out.Flush(); err != nil {
		return s.writeErr(ctx, err)
	}
	if err := f.Sync(); err != nil {
		return s.writeErr(ctx, err)
	}
	return nil
}

// writeErr is the error of a failed write: ctx's when it ended (a cancel), a qubesd
// exception as it is, else qubesd's QubesException of a failed pipeline.
func (s *Service) writeErr(ctx context.Context, err error) error {
	var qe *qerr.Error
	switch {
	case ctx.Err() != nil:
		return ctx.Err()
	case errors.As(err, &qe), errors.Is(err, qerr.ErrAbort):
		return err
	}
	return qerr.QubesException("Failed to write the backup: " + err.Error())
}

// targetPath is where the archive goes, as qubesd's backup_do decides it: in dom0 a
// directory gets qubes-<time>, else the path itself, whose directory must exist. A
// qube's qubes.Backup service writes qubes-backup-<time> into a directory and fails
// otherwise; here the qube's filesystem is its sink directory.
func (s *Service) targetPath(j *job, now time.Time) (string, error) {
	dest := j.profile.DestinationPath
	if j.destVM == "" {
		if isDir(dest) {
			return dest + "/qubes-" + now.Format("2006-01-02T150405"), nil
		}
		if d := pyDirname(dest); d == "" || !exists(d) {
			return "", qerr.QubesException(fmt.Sprintf("ERROR: the backup directory for %s does not exists", dest))
		}
		return dest, nil
	}
	failed := qerr.QubesException(fmt.Sprintf("Writing backup to VM %s failed", j.destVM))
	if s.cfg.SinkDir == "" {
		return "", failed
	}
	root, err := SinkOf(s.cfg.SinkDir, j.destVM)
	if err != nil {
		return "", fmt.Errorf("%w: %w", qerr.ErrAbort, err)
	}
	// qubes.Backup reads one line: CR and LF are dropped, as qubesd sends it.
	line := strings.NewReplacer("\r", "", "\n", "").Replace(dest)
	dir := filepath.Join(root, strings.TrimPrefix(filepath.Clean("/"+line), "/"))
	if !isDir(dir) {
		return "", failed
	}
	return filepath.Join(dir, "qubes-backup-"+now.Format("2006-01-02T150405")), nil
}

// SinkOf is the directory that stands for a qube's filesystem under sinkDir (created
// on first use): <sinkDir>/<qube>.
func SinkOf(sinkDir, qube string) (string, error) {
	if qube == "" || qube == "." || qube == ".." || strings.ContainsRune(qube, '/') {
		return "", fmt.Errorf("qube name %q cannot name a sink", qube)
	}
	dir := filepath.Join(sinkDir, qube)
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return "", err
	}
	return dir, nil
}

// pyDirname is Python's os.path.dirname: "" when there is no "/".
func pyDirname(p string) string {
	i := strings.LastIndexByte(p, '/')
	if i < 0 {
		return ""
	}
	head := p[:i+1]
	if t := strings.TrimRight(head, "/"); t != "" {
		return t
	}
	return head
}

func isDir(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.IsDir()
}

func exists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// backupXML is the qubes.xml a backup carries: the whole configuration, each qube
// marked with features backup-content ("1" for those in the backup, with their
// backup-path and backup-size) and without its preloaded-disposable bookkeeping, as
// qubesd's backup_do writes it.
func backupXML(conf *config.Config, entries []Entry) ([]byte, error) {
	c := conf.Clone()
	var ops []config.Op
	for _, d := range c.Domains {
		ops = append(ops, config.Op{Kind: config.OpSetFeature, Domain: d.ID, Name: "backup-content", Value: ""})
	}
	for _, e := range entries {
		id := e.Domain.ID
		ops = append(ops,
			config.Op{Kind: config.OpSetFeature, Domain: id, Name: "backup-content", Value: "1"},
			config.Op{Kind: config.OpSetFeature, Domain: id, Name: "backup-path", Value: e.Subdir},
			config.Op{Kind: config.OpSetFeature, Domain: id, Name: "backup-size", Value: strconv.FormatInt(e.Size(), 10)})
		for _, f := range e.Domain.Features {
			if strings.HasPrefix(f.Name, "preload-dispvm") && f.Name != "preload-dispvm-max" {
				ops = append(ops, config.Op{Kind: config.OpDelFeature, Domain: id, Name: f.Name})
			}
		}
	}
	if err := config.Apply(c, ops); err != nil {
		return nil, err
	}
	return qubesxml.Marshal(c)
}

// volumeReader reads a volume's data through the storage service.
type volumeReader struct {
	ctx          context.Context
	vols         VolumeData
	qube, volume string
}

func (r *volumeReader) ReadAt(p []byte, off int64) (int, error) {
	done := 0
	for done < len(p) {
		n, err := r.vols.ReadVolume(r.ctx, r.qube, r.volume, p[done:], off+int64(done))
		done += n
		if err != nil {
			return done, err
		}
		if n == 0 {
			return done, fmt.Errorf("%s:%s: empty read at %d", r.qube, r.volume, off+int64(done))
		}
	}
	return done, nil
}

// progress sends backup-progress events as qubesd: the percentage of the total size
// done, at most one per interval, none when the total is 0.
type progress struct {
	s                *Service
	ctx              context.Context
	profile          string
	total, done, cur int64
	last             time.Time
}

func (s *Service) newProgress(ctx context.Context, j *job) *progress {
	p := &progress{s: s, ctx: ctx, profile: j.profile.ID, last: s.cfg.Now()}
	for _, e := range j.files() {
		p.total += e.Size()
	}
	return p
}

func (p *progress) add(n int64) {
	p.cur += n
	p.send()
}

func (p *progress) vmDone(size int64) {
	p.done += size
	p.cur = 0
	p.send()
}

func (p *progress) send() {
	if p.total == 0 {
		return
	}
	now := p.s.cfg.Now()
	if now.Sub(p.last) < p.s.cfg.ProgressInterval {
		return
	}
	p.last = now
	pct := 100 * float64(p.done+p.cur) / float64(p.total)
	ev := cloudevent.New("", "backup-progress", "backup_profile", p.profile, "progress", pyFloat(pct))
	if err := p.s.publish(p.ctx, ev); err != nil && p.ctx.Err() == nil {
		p.s.log.Warn("backup progress event", "profile", p.profile, "err", err)
	}
}

// pyFloat is Python's str of a float: the shortest repr, ".0" on whole numbers,
// exponent form below 1e-4 and from 1e16.
func pyFloat(f float64) string {
	a := math.Abs(f)
	if a != 0 && (a < 1e-4 || a >= 1e16) {
		return strconv.FormatFloat(f, 'e', -1, 64)
	}
	s := strconv.FormatFloat(f, 'f', -1, 64)
	if !strings.ContainsAny(s, ".nI") {
		s += ".0"
	}
	return s
}

// stamp records backup_timestamp on every qube in the backup, as qubesd's setattr:
// property-pre-set, the change, property-set, one qube after the other; then
// qubes.xml is saved.
func (s *Service) stamp(ctx context.Context, j *job) error {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.WriteTimeout)
	defer cancel()
	value := strconv.FormatInt(s.cfg.Now().Unix(), 10)
	var rev uint64
	for _, e := range j.files() {
		name, id := e.Domain.Name(), e.Domain.ID
		old := "None"
		s.rep.ViewIndexed(func(_ *config.Config, byName func(string) *config.Domain) {
			if d := byName(name); d != nil {
				if v, ok := d.Property("backup_timestamp"); ok {
					old = v
				}
			}
		})
		kw := []string{"name", "backup_timestamp", "newvalue", value, "oldvalue", old}
		if err := s.publish(ctx, cloudevent.New(name, "property-pre-set:backup_timestamp", kw...)); err != nil {
			return err
		}
		var err error
		if rev, err = s.apply(ctx, config.Op{Kind: config.OpSetProperty, Domain: id, Name: "backup_timestamp", Value: value}); err != nil {
			return err
		}
		if err := s.publish(ctx, cloudevent.New(name, "property-set:backup_timestamp", kw...)); err != nil {
			return err
		}
	}
	if rev == 0 {
		return nil
	}
	if err := s.store.Flush(ctx, rev); err != nil {
		return fmt.Errorf("%w: save qubes.xml: %w", qerr.ErrAbort, err)
	}
	return nil
}

// apply applies one op at the replica's revision, again after another writer came
// first, and waits until the replica has it.
func (s *Service) apply(ctx context.Context, op config.Op) (uint64, error) {
	for attempt := 0; ; attempt++ {
		rev := s.rep.Revision()
		newRev, err := s.store.Apply(ctx, config.Mutation{ExpectRevision: rev, Ops: []config.Op{op}})
		if errors.Is(err, config.ErrStaleRevision) && attempt < 32 {
			if werr := s.rep.WaitRevision(ctx, rev+1); werr != nil {
				return 0, fmt.Errorf("%w: wait for config: %w", qerr.ErrAbort, werr)
			}
			continue
		}
		if err != nil {
			return 0, fmt.Errorf("%w: apply: %w", qerr.ErrAbort, err)
		}
		if err := s.rep.WaitRevision(ctx, newRev); err != nil {
			return 0, fmt.Errorf("%w: %w", qerr.ErrAbort, err)
		}
		return newRev, nil
	}
}
