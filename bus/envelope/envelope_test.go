package envelope

import (
	"errors"
	"fmt"
	"testing"

	"github.com/nats-io/nats.go"

	"github.com/qubesbus/qubesbus/bus/qerr"
)

func TestRequestRoundTrip(t *testing.T) {
	in := &Request{Method: "admin.vm.L\xffst", Arg: "a b\r\n%", Source: "dom0", Dest: "x y z", Payload: []byte("p\x00q"), ID: "r1"}
	m := in.Msg("subj")
	for k, vs := range m.Header {
		for _, v := range vs {
			for i := 0; i < len(v); i++ {
				if v[i] <= ' ' || v[i] >= 0x7f {
					t.Fatalf("header %s holds raw byte %#x", k, v[i])
				}
			}
		}
	}
	out, err := ParseRequest(m.Header, m.Data)
	if err != nil {
		t.Fatal(err)
	}
	if out.Method != in.Method || out.Arg != in.Arg || out.Source != in.Source || out.Dest != in.Dest || string(out.Payload) != string(in.Payload) || out.ID != in.ID {
		t.Fatalf("round trip: got %+v, want %+v", out, in)
	}
}

func TestParseRequestRejectsBadEscape(t *testing.T) {
	h := nats.Header{}
	h.Set(HeaderArg, "%G1")
	if _, err := ParseRequest(h, nil); !errors.Is(err, ErrMalformed) {
		t.Fatalf("err = %v, want ErrMalformed", err)
	}
}

func TestReplies(t *testing.T) {
	tests := []struct {
		name    string
		err     error
		status  string
		wantErr error
	}{
		{"exception", qerr.VMNotFoundError("No such domain: " + qerr.Repr("x")), StatusException, qerr.ErrVMNotFound},
		{"abort", qerr.Abort("write-once"), StatusAbort, qerr.ErrAbort},
		{"plain go error aborts", errors.New("boom"), StatusAbort, qerr.ErrAbort},
		{"wrapped exception", fmt.Errorf("get: %w", qerr.ValueError("bad")), StatusException, qerr.ValueError("")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h, body := Failure(tt.err)
			r, err := ParseReply(&nats.Msg{Header: h, Data: body})
			if err != nil {
				t.Fatal(err)
			}
			if local := Result(nil, tt.err); !sameReply(local, r) {
				t.Fatalf("Result %+v, over the wire %+v", local, r)
			}
			if r.Status != tt.status || !errors.Is(r.Err(), tt.wantErr) {
				t.Fatalf("got %+v (%v)", r, r.Err())
			}
		})
	}
	h, body := OK([]byte("content"))
	r, err := ParseReply(&nats.Msg{Header: h, Data: body})
	if err != nil || r.Status != StatusOK || string(r.Content) != "content" || r.Err() != nil {
		t.Fatalf("ok reply: %+v %v", r, err)
	}
	if local := Result([]byte("content"), nil); !sameReply(local, r) {
		t.Fatalf("Result %+v, over the wire %+v", local, r)
	}
	h, _ = Failure(fmt.Errorf("wait: %w", ErrBehind))
	if r, err := ParseReply(&nats.Msg{Header: h}); err != nil || r.Status != StatusBehind || Result(nil, ErrBehind).Status != StatusBehind {
		t.Fatalf("behind: %+v %v", r, err)
	}
	if _, err := ParseReply(&nats.Msg{Header: nats.Header{}}); !errors.Is(err, ErrMalformed) {
		t.Fatalf("missing status: %v", err)
	}
}

func sameReply(a, b Reply) bool {
	if a.Status != b.Status || string(a.Content) != string(b.Content) || (a.Exception == nil) != (b.Exception == nil) {
		return false
	}
	return a.Exception == nil || *a.Exception == *b.Exception
}
