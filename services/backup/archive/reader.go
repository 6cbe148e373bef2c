package archive

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"regexp"
	"strconv"
	"strings"
)

// ErrBadArchive reports an archive that does not have format 4's layout.
var ErrBadArchive = errors.New("invalid backup archive")

// Archive is what Read found: the verified header, the outer files in order, and
// each inner file's content.
type Archive struct {
	Header Header
	Outer  []string // names of the outer files, in order
	Files  []InnerFile
}

// InnerFile is one file restored from its parts.
type InnerFile struct {
	Name   string // "qubes.xml", "vm5/private.img"
	Parts  int
	Size   int64 // the file's size in its inner tar
	Sparse bool  // a GNU sparse member
	SHA256 [32]byte
	Data   []byte // the content, when Size is at most ReadOptions.MaxData
}

// File returns the inner file of that name.
func (a *Archive) File(name string) (InnerFile, bool) {
	for _, f := range a.Files {
		if f.Name == name {
			return f, true
		}
	}
	return InnerFile{}, false
}

// ReadOptions bound what Read accepts.
type ReadOptions struct {
	MaxLogN uint8 // the most expensive scrypt parameters accepted (0: 22)
	MaxData int64 // inner files up to this size keep their Data (0: 64 MiB)
}

var partRE = regexp.MustCompile(`^(.+)\.([0-9]{3})\.enc$`)

// Read verifies and unpacks a whole archive in memory, checking what restore.py
// checks: the header first and its HMAC, every part's HMAC with its own passphrase
// (which binds it to its name and this backup), parts in sequence from .000, each
// inner stream a tar of exactly the file its parts are named after. Meant for tests
// and verification of modest archives: every file is held in memory.
func Read(ctx context.Context, r io.Reader, passphrase []byte, opts ReadOptions) (*Archive, error) {
	br := bufio.NewReaderSize(r, 64*1024)
	a := &Archive{}
	var headerData []byte
	haveHeader := false
	var cur *InnerFile
	var stream bytes.Buffer // the current inner file's decrypted parts

	finish := func() error {
		if cur == nil {
			return nil
		}
		if err := unpackInner(cur, stream.Bytes(), a.Header.Compressed, opts.MaxData); err != nil {
			return err
		}
		a.Files = append(a.Files, *cur)
		cur = nil
		stream.Reset()
		return nil
	}

	err := eachOuter(br, func(name string, data []byte) error {
		if err := ctx.Err(); err != nil {
			return err
		}
		a.Outer = append(a.Outer, name)
		switch {
		case len(a.Outer) == 1:
			if name != HeaderName {
				return fmt.Errorf("%w: first file %q, want %s", ErrBadArchive, name, HeaderName)
			}
			if len(data) > maxHeaderSize {
				return fmt.Errorf("%w: header too large", ErrBadArchive)
			}
			headerData = data
			return nil
		case len(a.Outer) == 2:
			if name != HeaderHMACName {
				return fmt.Errorf("%w: second file %q, want %s", ErrBadArchive, name, HeaderHMACName)
			}
			plain, err := Decrypt(data, PartPassphrase("", HeaderName, passphrase), opts.MaxLogN)
			if err != nil {
				return fmt.Errorf("%s: %w", name, err)
			}
			if !bytes.Equal(plain, headerData) {
				return fmt.Errorf("%w: invalid hmac on %s", ErrBadArchive, HeaderName)
			}
			h, err := ParseHeader(headerData)
			if err != nil {
				return err
			}
			a.Header = h
			haveHeader = true
			return nil
		}
		m := partRE.FindStringSubmatch(name)
		if m == nil {
			return fmt.Errorf("%w: unexpected file %q", ErrBadArchive, name)
		}
		if err := checkInnerName(m[1]); err != nil {
			return err
		}
		idx, _ := strconv.Atoi(m[2])
		if cur == nil || cur.Name != m[1] {
			if err := finish(); err != nil {
				return err
			}
			if idx != 0 {
				return fmt.Errorf("%w: %s: first part is %03d", ErrBadArchive, m[1], idx)
			}
			if _, dup := a.File(m[1]); dup {
				return fmt.Errorf("%w: %s twice", ErrBadArchive, m[1])
			}
			cur = &InnerFile{Name: m[1]}
		} else if idx != cur.Parts {
			return fmt.Errorf("%w: %s: part %03d after %03d", ErrBadArchive, m[1], idx, cur.Parts-1)
		}
		if len(a.Files) == 0 && m[1] != QubesXMLName {
			return fmt.Errorf("%w: %s before %s", ErrBadArchive, m[1], QubesXMLName)
		}
		pass := PartPassphrase(a.Header.BackupID, PartName(m[1], idx), passphrase)
		if err := DecryptTo(&stream, bytes.NewReader(data), pass, opts.MaxLogN); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		cur.Parts++
		return nil
	})
	if err != nil {
		return nil, err
	}
	if !haveHeader {
		return nil, fmt.Errorf("%w: no verified header", ErrBadArchive)
	}
	if err := finish(); err != nil {
		return nil, err
	}
	if _, ok := a.File(QubesXMLName); !ok {
		return nil, fmt.Errorf("%w: no %s", ErrBadArchive, QubesXMLName)
	}
	return a, nil
}

// checkInnerName refuses names restore.py would not accept: absolute, with "..", or
// other than qubes.xml and vmN/… or dom0-home/….
func checkInnerName(n string) error {
	if n == QubesXMLName {
		return nil
	}
	if strings.HasPrefix(n, "/") || strings.Contains(n, "..") {
		return fmt.Errorf("%w: file name %q", ErrBadArchive, n)
	}
	dir, _, ok := strings.Cut(n, "/")
	if !ok || (dir != "dom0-home" && !regexp.MustCompile(`^vm[0-9]+$`).MatchString(dir)) {
		return fmt.Errorf("%w: file name %q", ErrBadArchive, n)
	}
	return nil
}

// unpackInner decompresses an inner stream and reads its tar: exactly one regular file
// (a directory entry of its own path is allowed), named as its parts are.
func unpackInner(f *InnerFile, stream []byte, compressed bool, maxData int64) error {
	if maxData == 0 {
		maxData = 64 << 20
	}
	var r io.Reader = bytes.NewReader(stream)
	if compressed {
		gz, err := gzip.NewReader(r)
		if err != nil {
			return fmt.Errorf("%s: %w", f.Name, err)
		}
		gz.Multistream(false)
		r = gz
	}
	tr := tar.NewReader(r)
	found := false
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("%s: inner tar: %w", f.Name, err)
		}
		if h.Name != f.Name {
			return fmt.Errorf("%w: %s holds %q", ErrBadArchive, f.Name, h.Name)
		}
		if h.Typeflag != tar.TypeReg && h.Typeflag != tar.TypeGNUSparse {
			continue
		}
		sum := sha256.New()
		var keep bytes.Buffer
		var dst io.Writer = sum
		if h.Size <= maxData {
			dst = io.MultiWriter(sum, &keep)
		}
		if _, err := io.Copy(dst, tr); err != nil {
			return fmt.Errorf("%s: inner tar: %w", f.Name, err)
		}
		copy(f.SHA256[:], sum.Sum(nil))
		f.Size, f.Sparse, found = h.Size, h.Typeflag == tar.TypeGNUSparse, true
		if h.Size <= maxData {
			f.Data = keep.Bytes()
		}
	}
	if !found {
		return fmt.Errorf("%w: %s: inner tar has no file", ErrBadArchive, f.Name)
	}
	return nil
}

// eachOuter reads the concatenated outer tar archives (as `tar --ignore-zeros`),
// calling fn with each regular file.
func eachOuter(br *bufio.Reader, fn func(name string, data []byte) error) error {
	for {
		// Skip the zero blocks between archives (end-of-archive and record padding).
		block, err := br.Peek(512)
		if err == io.EOF && len(block) == 0 {
			return nil
		}
		if err != nil {
			return fmt.Errorf("%w: trailing %d bytes", ErrBadArchive, len(block))
		}
		if isZero(block) {
			br.Discard(512)
			continue
		}
		tr := tar.NewReader(br)
		for {
			h, err := tr.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				return fmt.Errorf("%w: outer tar: %w", ErrBadArchive, err)
			}
			if h.Typeflag != tar.TypeReg {
				return fmt.Errorf("%w: outer entry %q of type %q", ErrBadArchive, h.Name, h.Typeflag)
			}
			data, err := io.ReadAll(tr)
			if err != nil {
				return fmt.Errorf("%w: %s: %w", ErrBadArchive, h.Name, err)
			}
			if err := fn(h.Name, data); err != nil {
				return err
			}
		}
	}
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
