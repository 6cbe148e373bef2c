package archive

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"time"
)

// outerRecord is GNU tar's record size (20 blocks): each outer archive is padded to it.
const outerRecord = 10240

// Options of a Writer.
type Options struct {
	Passphrase []byte
	BackupID   string
	// Compressed compresses every inner file with CompressionFilter ("gzip", the only
	// filter written in process; the default).
	Compressed        bool
	CompressionFilter string
	ChunkSize         int64        // 0: DefaultChunkSize
	Scrypt            ScryptParams // zero: DefaultScryptParams
	TempDir           string       // where parts wait for their size to be known ("": os.TempDir)
	Now               func() time.Time
}

// Writer writes one archive. Call WriteHeader, then AddFile for qubes.xml and each
// file, then Close. Every method returns ctx's error once it is done, at the next
// buffer; the caller removes what was written.
type Writer struct {
	out  io.Writer
	opts Options
}

// NewWriter checks the options; nothing is written before WriteHeader.
func NewWriter(out io.Writer, opts Options) (*Writer, error) {
	if len(opts.Passphrase) == 0 {
		return nil, errors.New("no passphrase set")
	}
	if opts.BackupID == "" {
		return nil, errors.New("no backup id")
	}
	if opts.CompressionFilter == "" {
		opts.CompressionFilter = "gzip"
	}
	if opts.Compressed && opts.CompressionFilter != "gzip" {
		return nil, fmt.Errorf("compression filter %q: only gzip is supported", opts.CompressionFilter)
	}
	if opts.ChunkSize <= 0 {
		opts.ChunkSize = DefaultChunkSize
	}
	if opts.Scrypt == (ScryptParams{}) {
		opts.Scrypt = DefaultScryptParams
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	return &Writer{out: out, opts: opts}, nil
}

// Header is what WriteHeader writes.
func (w *Writer) Header() Header {
	return Header{
		Version: FormatVersion, Encrypted: true, Compressed: w.opts.Compressed,
		CompressionFilter: w.opts.CompressionFilter, HMACAlgorithm: "scrypt", BackupID: w.opts.BackupID,
	}
}

// WriteHeader writes backup-header and backup-header.hmac.
func (w *Writer) WriteHeader(ctx context.Context) error {
	hdr := w.Header().Marshal()
	if err := w.writeOuter(HeaderName, int64(len(hdr)), bytes.NewReader(hdr)); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	var enc bytes.Buffer
	e, err := NewEncrypter(ctx, &enc, PartPassphrase(w.opts.BackupID, HeaderName, w.opts.Passphrase), w.opts.Scrypt)
	if err != nil {
		return err
	}
	e.Write(hdr)
	if err := e.Close(); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	return w.writeOuter(HeaderHMACName, int64(enc.Len()), &enc)
}

// File is one inner file.
type File struct {
	Name    string // in the archive: "qubes.xml", "vm5/private.img"
	Size    int64
	Mode    int64 // 0: 0644
	ModTime time.Time
	Data    io.Reader // exactly Size bytes (a dense file)
	// Sparse, when not nil, writes a sparse member instead: only these regions are read
	// from SparseData (nil when there are none), the rest of Size is holes.
	Sparse     []Extent
	SparseData io.ReaderAt
}

// AddFile writes f as an inner tar, compressed, split and encrypted; progress (if
// set) is told each count of bytes of f read.
func (w *Writer) AddFile(ctx context.Context, f File, progress func(n int64)) error {
	sp := &splitter{ctx: ctx, w: w, inner: f.Name}
	defer sp.discard()
	var stream io.Writer = sp
	var gz *gzip.Writer
	if w.opts.Compressed {
		gz = gzip.NewWriter(sp)
		stream = gz
	}
	mode := f.Mode
	if mode == 0 {
		mode = 0o644
	}
	mt := f.ModTime
	if mt.IsZero() {
		mt = w.opts.Now()
	}
	if f.Sparse != nil {
		if err := writeSparse(stream, f, mode, mt.Unix(), progress, ctx.Err); err != nil {
			return err
		}
	} else if err := writeDense(ctx, stream, f, mode, mt, progress); err != nil {
		return err
	}
	if gz != nil {
		if err := gz.Close(); err != nil {
			return err
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	return sp.finish()
}

// writeDense writes f as a tar of one regular file.
func writeDense(ctx context.Context, stream io.Writer, f File, mode int64, mt time.Time, progress func(int64)) error {
	tw := tar.NewWriter(stream)
	if err := tw.WriteHeader(&tar.Header{
		Typeflag: tar.TypeReg, Name: f.Name, Size: f.Size, Mode: mode, ModTime: mt.Truncate(time.Second),
		Uname: "root", Gname: "root", Format: tar.FormatGNU,
	}); err != nil {
		return fmt.Errorf("%s: %w", f.Name, err)
	}
	buf := make([]byte, 1<<20)
	var done int64
	for done < f.Size {
		if err := ctx.Err(); err != nil {
			return err
		}
		n := int64(len(buf))
		if rest := f.Size - done; rest < n {
			n = rest
		}
		m, err := io.ReadFull(f.Data, buf[:n])
		if m > 0 {
			if _, werr := tw.Write(buf[:m]); werr != nil {
				return fmt.Errorf("%s: %w", f.Name, werr)
			}
			done += int64(m)
			if progress != nil {
				progress(int64(m))
			}
		}
		if err != nil {
			return fmt.Errorf("%s: read at %d of %d: %w", f.Name, done, f.Size, err)
		}
	}
	if err := tw.Close(); err != nil {
		return err
	}
	return nil
}

// Close ends the archive. The parts' outer archives are complete as written, so there
// is nothing more to write; it exists so a later format change has a place.
func (w *Writer) Close() error { return nil }

// splitter cuts the inner stream into parts of ChunkSize bytes, each encrypted into a
// temporary file and then written to the archive (its tar header needs its size).
type splitter struct {
	ctx   context.Context // ends a part's key derivation early
	w     *Writer
	inner string
	i     int
	tmp   *os.File
	enc   *Encrypter
	n     int64
	err   error
}

func (s *splitter) start() error {
	f, err := os.CreateTemp(s.w.opts.TempDir, "qubes-backup-part-*")
	if err != nil {
		return err
	}
	s.tmp = f
	s.n = 0
	name := PartName(s.inner, s.i)
	s.enc, err = NewEncrypter(s.ctx, f, PartPassphrase(s.w.opts.BackupID, name, s.w.opts.Passphrase), s.w.opts.Scrypt)
	return err
}

// flush ends the current part and writes it to the archive.
func (s *splitter) flush() error {
	if err := s.enc.Close(); err != nil {
		return err
	}
	size, err := s.tmp.Seek(0, io.SeekCurrent)
	if err != nil {
		return err
	}
	if _, err := s.tmp.Seek(0, io.SeekStart); err != nil {
		return err
	}
	if err := s.w.writeOuter(PartName(s.inner, s.i)+".enc", size, s.tmp); err != nil {
		return err
	}
	s.discard()
	s.i++
	return nil
}

func (s *splitter) Write(p []byte) (int, error) {
	if s.err != nil {
		return 0, s.err
	}
	written := 0
	for len(p) > 0 {
		if s.tmp == nil {
			if s.err = s.start(); s.err != nil {
				return written, s.err
			}
		}
		room := s.w.opts.ChunkSize - s.n
		chunk := p
		if int64(len(chunk)) > room {
			chunk = chunk[:room]
		}
		m, err := s.enc.Write(chunk)
		written += m
		s.n += int64(m)
		p = p[m:]
		if err != nil {
			s.err = err
			return written, err
		}
		if s.n == s.w.opts.ChunkSize {
			// As qubesd: a full part is sent and the next begins at once (so a
			// stream of an exact multiple of the size ends with an empty part).
			if s.err = s.flush(); s.err != nil {
				return written, s.err
			}
			if s.err = s.start(); s.err != nil {
				return written, s.err
			}
		}
	}
	return written, nil
}

func (s *splitter) finish() error {
	if s.err != nil {
		return s.err
	}
	if s.tmp == nil {
		if err := s.start(); err != nil {
			return err
		}
	}
	return s.flush()
}

func (s *splitter) discard() {
	if s.tmp != nil {
		s.tmp.Close()
		os.Remove(s.tmp.Name())
		s.tmp, s.enc = nil, nil
	}
}

// writeOuter writes one file as its own POSIX tar archive, as `tar -cO --posix` does:
// a pax header with the times, the file, the end-of-archive blocks, padding to a
// record.
func (w *Writer) writeOuter(name string, size int64, r io.Reader) error {
	cw := &countWriter{w: w.out}
	tw := tar.NewWriter(cw)
	now := w.opts.Now()
	if err := tw.WriteHeader(&tar.Header{
		Typeflag: tar.TypeReg, Name: name, Size: size, Mode: 0o644,
		ModTime: now, AccessTime: now, ChangeTime: now,
		Uname: "root", Gname: "root", Format: tar.FormatPAX,
	}); err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	if _, err := io.CopyN(tw, r, size); err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	if err := tw.Close(); err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	if pad := (outerRecord - cw.n%outerRecord) % outerRecord; pad > 0 {
		if _, err := cw.Write(make([]byte, pad)); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
	}
	return nil
}

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}
