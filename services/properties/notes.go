package properties

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/qerr"
	"github.com/qubesbus/qubesbus/bus/rpc"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/schemas/model"
)

// MaxNoteSize is the largest note qubesd accepts.
const MaxNoteSize = 256000

// NotesBucket is the JetStream key-value bucket of qube notes, shared by every
// properties instance of every host.
const NotesBucket = "QUBES_NOTES"

// NotesConfig configures the notes bucket.
type NotesConfig struct {
	Replicas int // JetStream replicas: 1 (default) or 3 in a cluster
}

// OpenNotes creates or updates the notes bucket (file storage, last value only).
func OpenNotes(ctx context.Context, js jetstream.JetStream, cfg NotesConfig) (jetstream.KeyValue, error) {
	if cfg.Replicas == 0 {
		cfg.Replicas = 1
	}
	kv, err := bus.RetryJSFor(ctx, nil, "bucket "+NotesBucket, func(ctx context.Context) (jetstream.KeyValue, error) {
		return js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
			Bucket:       NotesBucket,
			Description:  "admin.vm.notes: one key per host and qube UUID",
			History:      1,
			MaxValueSize: MaxNoteSize, // sanitising never makes a note longer
			Storage:      jetstream.FileStorage,
			Replicas:     cfg.Replicas,
		})
	})
	if err != nil {
		return nil, fmt.Errorf("notes bucket %s: %w", NotesBucket, err)
	}
	return kv, nil
}

// notes keeps each qube's notes under a key made of the host and the qube's UUID
// (stable for the qube's life, never reused), so every instance sees the same notes.
type notes struct {
	kv   jetstream.KeyValue
	host string // escaped key token of the host
}

func newNotes(kv jetstream.KeyValue, host subject.Host) *notes {
	return &notes{kv: kv, host: subject.KVToken(host.ID())}
}

func (n *notes) key(uuid string) string { return n.host + "." + subject.KVToken(uuid) }

func (n *notes) get(ctx context.Context, uuid string) (string, error) {
	e, err := n.kv.Get(ctx, n.key(uuid))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	return string(e.Value()), nil
}

func (n *notes) set(ctx context.Context, uuid, text string) error {
	_, err := n.kv.Put(ctx, n.key(uuid), []byte(text))
	return err
}

// remove purges the key: the note's text does not stay in the bucket.
func (n *notes) remove(ctx context.Context, uuid string) error {
	err := n.kv.Purge(ctx, n.key(uuid))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil
	}
	return err
}

func destUUID(c *rpc.Call) string { return c.Dest.UUID }

func (s *Service) notesGet(ctx context.Context, c *rpc.Call) ([]byte, error) {
	text, err := s.notes.get(ctx, destUUID(c))
	if err != nil {
		return nil, qerr.QubesException("Failed to read notes file: " + err.Error())
	}
	return []byte(text), nil
}

func (s *Service) notesSet(ctx context.Context, c *rpc.Call) ([]byte, error) {
	if len(c.Payload) > MaxNoteSize {
		return nil, qerr.ProtocolError(fmt.Sprintf("Maximum note size is %d bytes (%d bytes received)", MaxNoteSize, len(c.Payload)))
	}
	text, err := SanitiseNotes(c.Payload)
	if err != nil {
		return nil, qerr.ProtocolError("Unable to sanitise qube notes: " + err.Error())
	}
	// The qube may be removed meanwhile; its notes must not outlive it.
	var exists bool
	s.view(nil, func(m *model.Model) ([]byte, error) {
		exists = m.Domain(c.Dest.Name) != nil
		return nil, nil
	})
	if !exists {
		return nil, qerr.VMNotFoundError("No such domain: " + qerr.Repr(c.Dest.Name))
	}
	if err := s.notes.set(ctx, destUUID(c), text); err != nil {
		return nil, qerr.QubesException("Failed to write notes file: " + err.Error())
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

// openNotesBucket opens the notes bucket, creating it if this connection may. A user
// without the right to create it (deploy/nats permissions) binds to the one an admin
// created with `qubesbus setup`.
func openNotesBucket(ctx context.Context, js jetstream.JetStream, replicas int, log *slog.Logger) (jetstream.KeyValue, error) {
	kv, err := OpenNotes(ctx, js, NotesConfig{Replicas: replicas})
	if err == nil {
		return kv, nil
	}
	kv, berr := js.KeyValue(ctx, NotesBucket)
	if berr != nil {
		return nil, errors.Join(err, berr)
	}
	log.Warn("notes bucket not ensured; using the existing one", "err", err)
	return kv, nil
}
