package properties

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/qubesbus/qubesbus/bus/qerr"
	"github.com/qubesbus/qubesbus/bus/rpc"
	"github.com/qubesbus/qubesbus/services/properties/model"
)

// MaxNoteSize is the largest note qubesd accepts.
const MaxNoteSize = 256000

// notes keeps each qube's notes in one file, named by the qube's UUID (stable for the
// qube's life, never reused), under a directory of the host.
type notes struct{ dir string }

func (n *notes) path(uuid string) string { return filepath.Join(n.dir, uuid+".txt") }

func (n *notes) get(uuid string) (string, error) {
	b, err := os.ReadFile(n.path(uuid))
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil
	}
	return string(b), err
}

// set writes atomically: a temporary file, fsync, rename.
func (n *notes) set(uuid, text string) error {
	if err := os.MkdirAll(n.dir, 0o770); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(n.dir, uuid+".txt~")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.WriteString(text); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), n.path(uuid))
}

func (n *notes) remove(uuid string) error {
	err := os.Remove(n.path(uuid))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	return err
}

func destUUID(c *rpc.Call) string { return c.Dest.UUID }

func (s *Service) notesGet(_ context.Context, c *rpc.Call) ([]byte, error) {
	text, err := s.notes.get(destUUID(c))
	if err != nil {
		return nil, qerr.New("QubesException", "Failed to read notes file: "+err.Error())
	}
	return []byte(text), nil
}

func (s *Service) notesSet(_ context.Context, c *rpc.Call) ([]byte, error) {
	if len(c.Payload) > MaxNoteSize {
		return nil, qerr.Protocol(fmt.Sprintf("Maximum note size is %d bytes (%d bytes received)", MaxNoteSize, len(c.Payload)))
	}
	text, err := SanitiseNotes(c.Payload)
	if err != nil {
		return nil, qerr.Protocol("Unable to sanitise qube notes: " + err.Error())
	}
	// The qube may be removed meanwhile; its notes must not outlive it.
	var exists bool
	s.view(nil, func(m *model.Model) ([]byte, error) {
		exists = m.Domain(c.Dest.Name) != nil
		return nil, nil
	})
	if !exists {
		return nil, qerr.New("QubesVMNotFoundError", "No such domain: "+qerr.Repr(c.Dest.Name))
	}
	if err := s.notes.set(destUUID(c), text); err != nil {
		return nil, qerr.New("QubesException", "Failed to write notes file: "+err.Error())
	}
	return nil, nil
}

// SanitiseNotes decodes UTF-8 and replaces every code point that is not safe to
// display (controls other than tab and newline, format characters, separators other
// than space, private use, unassigned) with '_'. Invalid UTF-8 is an error worded as
// Python's decoder words it.
func SanitiseNotes(b []byte) (string, error) {
	if err := checkUTF8(b); err != nil {
		return "", err
	}
	var out strings.Builder
	out.Grow(len(b))
	for _, r := range string(b) {
		if r == '\t' || r == '\n' || unicode.IsPrint(r) {
			out.WriteRune(r)
		} else {
			out.WriteByte('_')
		}
	}
	return out.String(), nil
}

// checkUTF8 reports the first invalid sequence like Python's "utf-8" codec does.
func checkUTF8(b []byte) error {
	for i := 0; i < len(b); {
		r, size := utf8.DecodeRune(b[i:])
		if r != utf8.RuneError || size > 1 {
			i += size
			continue
		}
		c := b[i]
		reason := "invalid start byte"
		if c >= 0xc2 && c <= 0xf4 {
			need := 2
			if c >= 0xe0 {
				need = 3
			}
			if c >= 0xf0 {
				need = 4
			}
			lo, hi := byte(0x80), byte(0xbf) // allowed range of the second byte
			switch c {
			case 0xe0:
				lo = 0xa0
			case 0xed:
				hi = 0x9f
			case 0xf0:
				lo = 0x90
			case 0xf4:
				hi = 0x8f
			}
			valid := 1
			for valid < need && i+valid < len(b) {
				x := b[i+valid]
				if valid > 1 {
					lo, hi = 0x80, 0xbf
				}
				if x < lo || x > hi {
					break
				}
				valid++
			}
			reason = "invalid continuation byte"
			if i+valid == len(b) {
				reason = "unexpected end of data"
			}
			if valid > 1 {
				return fmt.Errorf("'utf-8' codec can't decode bytes in position %d-%d: %s", i, i+valid-1, reason)
			}
		}
		return fmt.Errorf("'utf-8' codec can't decode byte 0x%02x in position %d: %s", c, i, reason)
	}
	return nil
}
