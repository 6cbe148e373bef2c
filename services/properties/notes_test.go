package properties

import (
	"context"
	"fmt"
	"testing"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/bus/subject"
)

func TestSanitiseNotes(t *testing.T) {
	for _, tc := range []struct{ in, want, err string }{
		{in: "plain\ttext\nline", want: "plain\ttext\nline"},
		{in: "bs\x08 nbsp\u00a0 zwsp\u200b zwnj\u200c zwj\u200d", want: "bs_ nbsp_ zwsp_ zwnj_ zwj_"},
		{in: "caf\u00e9 \u4e2d\u6587 \U0001F600", want: "caf\u00e9 \u4e2d\u6587 \U0001F600"},
		{in: "\r\x00\x7f\u0085\ue000", want: "_____"},
		// Invalid UTF-8 is reported as Python's decoder words it.
		{in: "\xff", err: "'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"},
		{in: "a\xc3", err: "'utf-8' codec can't decode byte 0xc3 in position 1: unexpected end of data"},
		{in: "\xe2\x82", err: "'utf-8' codec can't decode bytes in position 0-1: unexpected end of data"},
		{in: "\xe2\x82a", err: "'utf-8' codec can't decode bytes in position 0-1: invalid continuation byte"},
		{in: "\xe0\x80", err: "'utf-8' codec can't decode byte 0xe0 in position 0: invalid continuation byte"},
		{in: "\xed\xa0\x80", err: "'utf-8' codec can't decode byte 0xed in position 0: invalid continuation byte"},
		{in: "\xc3(", err: "'utf-8' codec can't decode byte 0xc3 in position 0: invalid continuation byte"},
		{in: "\xf0\x90\x80", err: "'utf-8' codec can't decode bytes in position 0-2: unexpected end of data"},
		{in: "\x80", err: "'utf-8' codec can't decode byte 0x80 in position 0: invalid start byte"},
	} {
		got, err := SanitiseNotes([]byte(tc.in))
		if tc.err != "" {
			if err == nil || err.Error() != tc.err {
				t.Errorf("SanitiseNotes(%q) error %v, want %s", tc.in, err, tc.err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("SanitiseNotes(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
		}
	}
}

func FuzzSanitiseNotes(f *testing.F) {
	f.Add([]byte("a\xc3\x28\u200b"))
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := SanitiseNotes(b)
		if err != nil {
			return
		}
		if again, err := SanitiseNotes([]byte(s)); err != nil || again != s {
			t.Fatalf("not idempotent: %q → %q → %q (%v)", b, s, again, err)
		}
	})
}

// stop stops instance i and closes its connection; the flush makes sure the server has
// dropped its subscriptions before the next call.
func (h *harness) stop(i int) {
	h.t.Helper()
	if err := h.services[i].Stop(); err != nil {
		h.t.Fatal(err)
	}
	if err := h.clients[i].Flush(); err != nil {
		h.t.Fatal(err)
	}
	h.clients[i].Close()
}

// Notes live in the shared bucket: an instance sees the notes another one set, and
// they survive every instance's restart.
func TestNotesShared(t *testing.T) {
	h := newHarness(t, 1)
	const note = "shared\tnote\n\u200b"
	h.expect("admin.vm.notes.Set", "work", "", note, "0:")
	h.start()
	h.stop(0) // only instance 1 answers now
	h.expect("admin.vm.notes.Get", "work", "", "", "0:shared\tnote\n_")
	h.expect("admin.vm.notes.Get", "personal", "", "", "0:")
	h.expect("admin.vm.notes.Set", "personal", "", "p", "0:")
	h.stop(1) // restart: a fresh instance opens the bucket again
	h.start()
	h.expect("admin.vm.notes.Get", "work", "", "", "0:shared\tnote\n_")
	h.expect("admin.vm.notes.Get", "personal", "", "", "0:p")
	h.expect("admin.vm.notes.Set", "work", "", " ", "0:")
	h.expect("admin.vm.notes.Get", "work", "", "", "0: ")
}

// Two instances answering at once (a queue group) agree whichever answers.
func TestNotesQueueGroup(t *testing.T) {
	h := newHarness(t, 2)
	for i := range 20 {
		text := fmt.Sprint("note ", i)
		h.expect("admin.vm.notes.Set", "work", "", text, "0:")
		h.expect("admin.vm.notes.Get", "work", "", "", "0:"+text)
	}
}

// Each host has its own keys: the same UUID on two hosts holds two notes.
func TestNotesPerHost(t *testing.T) {
	ns := bustest.RunJetStream(t)
	ctx := context.Background()
	js, err := jetstream.New(bustest.Connect(t, ns))
	if err != nil {
		t.Fatal(err)
	}
	kv, err := OpenNotes(ctx, js, NotesConfig{})
	if err != nil {
		t.Fatal(err)
	}
	a, b := newNotes(kv, subject.ForHost("a")), newNotes(kv, subject.ForHost("b"))
	const uuid = "4d2f8e6a-1b3c-4d5e-8f90-123456789abc"
	if err := a.set(ctx, uuid, "on a"); err != nil {
		t.Fatal(err)
	}
	if got, err := b.get(ctx, uuid); err != nil || got != "" {
		t.Fatalf("host b: %q, %v", got, err)
	}
	if got, err := a.get(ctx, uuid); err != nil || got != "on a" {
		t.Fatalf("host a: %q, %v", got, err)
	}
	if err := a.remove(ctx, uuid); err != nil {
		t.Fatal(err)
	}
	if err := a.remove(ctx, uuid); err != nil {
		t.Fatal(err)
	}
	if got, err := a.get(ctx, uuid); err != nil || got != "" {
		t.Fatalf("removed: %q, %v", got, err)
	}
}
