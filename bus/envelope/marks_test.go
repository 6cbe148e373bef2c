package envelope

import (
	"errors"
	"testing"

	"github.com/nats-io/nats.go"
)

func TestRuntimeMarkOrder(t *testing.T) {
	old := RuntimeMark{Epoch: 5, Version: 900}
	same := RuntimeMark{Epoch: 5, Version: 901}
	newer := RuntimeMark{Epoch: 6, Version: 1}
	if !old.Less(same) || same.Less(old) {
		t.Fatalf("versions of one epoch do not order: %v %v", old, same)
	}
	if !same.Less(newer) || newer.Less(same) {
		t.Fatal("a newer epoch must order after any version of an older one")
	}
	if old.Less(old) {
		t.Fatal("a mark orders before itself")
	}
	if got := old.Max(newer).Max(same); got != newer {
		t.Fatalf("Max = %v, want %v", got, newer)
	}
}

func TestMarksRoundTrip(t *testing.T) {
	in := &Request{Method: "admin.vm.List", Source: "dom0", Dest: "dom0",
		After: Marks{ConfigRev: 42, Runtime: RuntimeMark{Epoch: 1764000000123456789, Version: 7}}}
	m := in.Msg("subj")
	out, err := ParseRequest(m.Header, m.Data)
	if err != nil {
		t.Fatal(err)
	}
	if out.After != in.After {
		t.Fatalf("marks: got %+v, want %+v", out.After, in.After)
	}
	// No marks, no headers: requests from before marks existed still parse.
	bare := (&Request{Method: "x", Source: "dom0", Dest: "dom0"}).Msg("subj")
	if bare.Header.Get(HeaderConfigRev) != "" || bare.Header.Get(HeaderRuntime) != "" {
		t.Fatalf("zero marks were written: %v", bare.Header)
	}
	if r, err := ParseRequest(bare.Header, nil); err != nil || r.After != (Marks{}) {
		t.Fatalf("bare request: %+v, %v", r, err)
	}
}

func TestReplyCarriesMarks(t *testing.T) {
	h, body := OK([]byte("x"))
	Marks{ConfigRev: 3}.Set(h)
	rep, err := ParseReply(&nats.Msg{Header: h, Data: body})
	if err != nil || rep.Marks.ConfigRev != 3 || string(rep.Content) != "x" {
		t.Fatalf("reply = %+v, %v", rep, err)
	}
}

func TestParseMarksRejectsGarbage(t *testing.T) {
	for _, hv := range [][2]string{{HeaderConfigRev, "-1"}, {HeaderRuntime, "12"}, {HeaderRuntime, "a.b"}, {HeaderRuntime, "1.2.3"}} {
		h := nats.Header{}
		h.Set(hv[0], hv[1])
		if _, err := ParseMarks(h); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: %q: err = %v, want ErrMalformed", hv[0], hv[1], err)
		}
	}
}
