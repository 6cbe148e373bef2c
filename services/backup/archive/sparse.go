package archive

import (
	"fmt"
	"io"
	"strconv"
)

// Extent is a data region of a sparse file; the rest of the file is a hole.
type Extent struct {
	Offset, Length int64
}

const (
	blockSize     = 512
	innerRecord   = 10240 // GNU tar pads every archive to a record
	headerEntries = 4     // sparse entries in the GNU header
	extEntries    = 21    // in each extension block
)

// writeSparse writes f as one GNU sparse member (type 'S', the old GNU format that
// `tar -c --sparse` writes, as in qubesd's archives): the header with the sparse map,
// extension blocks when the map is long, then only the data regions, then the
// end-of-archive blocks, the whole padded to a record. Holes cost nothing.
func writeSparse(w io.Writer, f File, mode int64, mtime int64, progress func(int64), canceled func() error) error {
	entries := append([]Extent(nil), f.Sparse...)
	var stored int64
	for i, e := range entries {
		if e.Offset < 0 || e.Length < 0 || e.Offset+e.Length > f.Size || (i > 0 && e.Offset < entries[i-1].Offset+entries[i-1].Length) {
			return fmt.Errorf("%s: bad sparse map", f.Name)
		}
		stored += e.Length
	}
	if n := len(entries); n == 0 || entries[n-1].Offset+entries[n-1].Length < f.Size {
		entries = append(entries, Extent{Offset: f.Size})
	}
	if len(f.Name) >= 100 {
		return fmt.Errorf("%s: name too long for a sparse member", f.Name)
	}
	var hdr [blockSize]byte
	copy(hdr[0:100], f.Name)
	putNumber(hdr[100:108], mode)
	putNumber(hdr[108:116], 0)
	putNumber(hdr[116:124], 0)
	putNumber(hdr[124:136], stored)
	putNumber(hdr[136:148], mtime)
	hdr[156] = 'S'
	copy(hdr[257:263], "ustar ")
	copy(hdr[263:265], " \x00")
	copy(hdr[265:297], "root")
	copy(hdr[297:329], "root")
	for i := 0; i < headerEntries && i < len(entries); i++ {
		putNumber(hdr[386+24*i:398+24*i], entries[i].Offset)
		putNumber(hdr[398+24*i:410+24*i], entries[i].Length)
	}
	rest := entries[min(headerEntries, len(entries)):]
	if len(rest) > 0 {
		hdr[482] = 1
	}
	putNumber(hdr[483:495], f.Size)
	putChecksum(&hdr)
	cw := &countWriter{w: w}
	if _, err := cw.Write(hdr[:]); err != nil {
		return err
	}
	for len(rest) > 0 {
		var ext [blockSize]byte
		n := min(extEntries, len(rest))
		for i := 0; i < n; i++ {
			putNumber(ext[24*i:24*i+12], rest[i].Offset)
			putNumber(ext[24*i+12:24*i+24], rest[i].Length)
		}
		rest = rest[n:]
		if len(rest) > 0 {
			ext[504] = 1
		}
		if _, err := cw.Write(ext[:]); err != nil {
			return err
		}
	}
	buf := make([]byte, 1<<20)
	for _, e := range f.Sparse {
		for off := e.Offset; off < e.Offset+e.Length; {
			if err := canceled(); err != nil {
				return err
			}
			n := min(int64(len(buf)), e.Offset+e.Length-off)
			m, err := f.SparseData.ReadAt(buf[:n], off)
			if int64(m) < n {
				if err == nil || err == io.EOF {
					err = io.ErrUnexpectedEOF
				}
				return fmt.Errorf("%s: read at %d: %w", f.Name, off, err)
			}
			if _, err := cw.Write(buf[:n]); err != nil {
				return err
			}
			off += n
			if progress != nil {
				progress(n)
			}
		}
	}
	// Pad the data to a block, add the two end-of-archive blocks, pad to a record.
	pad := (blockSize - cw.n%blockSize) % blockSize
	pad += 2 * blockSize
	pad += (innerRecord - (cw.n+pad)%innerRecord) % innerRecord
	_, err := cw.Write(make([]byte, pad))
	return err
}

// putNumber writes a tar numeric field: octal with a NUL when it fits, else GNU's
// base-256 (the high bit of the first byte set), as GNU tar does for large sizes.
func putNumber(field []byte, v int64) {
	s := strconv.FormatInt(v, 8)
	if len(s) < len(field) {
		pad := len(field) - 1 - len(s)
		for i := 0; i < pad; i++ {
			field[i] = '0'
		}
		copy(field[pad:], s)
		field[len(field)-1] = 0
		return
	}
	for i := len(field) - 1; i > 0; i-- {
		field[i] = byte(v)
		v >>= 8
	}
	field[0] = 0x80
}

func putChecksum(h *[blockSize]byte) {
	for i := 148; i < 156; i++ {
		h[i] = ' '
	}
	var sum int64
	for _, c := range h {
		sum += int64(c)
	}
	s := strconv.FormatInt(sum, 8)
	for len(s) < 6 {
		s = "0" + s
	}
	copy(h[148:154], s)
	h[154] = 0
	h[155] = ' '
}
