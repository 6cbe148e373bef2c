package gateway

import (
	"bytes"
	"errors"
	"testing"

	"github.com/qubesbus/qubesbus/bus/envelope"
)

func TestDecodeRequest(t *testing.T) {
	tests := []struct {
		name                            string
		in                              string
		method, arg, src, dest, payload string
		wantErr                         bool
	}{
		{name: "plus", in: "admin.vm.List+ dom0 name dom0\x00", method: "admin.vm.List", src: "dom0", dest: "dom0"},
		{name: "no plus", in: "admin.vm.List dom0 name work\x00", method: "admin.vm.List", src: "dom0", dest: "work"},
		{name: "arg with plus", in: "admin.vm.Shutdown+force+wait dom0 name work\x00", method: "admin.vm.Shutdown", arg: "force+wait", src: "dom0", dest: "work"},
		{name: "keyword adminvm", in: "admin.vm.List+ dom0 keyword adminvm\x00", method: "admin.vm.List", src: "dom0", dest: "dom0"},
		{name: "dest keeps spaces", in: "m+ dom0 name a b c\x00", method: "m", src: "dom0", dest: "a b c"},
		{name: "payload with nul", in: "m+a s name d\x00x\x00y", method: "m", arg: "a", src: "s", dest: "d", payload: "x\x00y"},
		{name: "no nul", in: "admin.vm.List+ dom0 name dom0", wantErr: true},
		{name: "too few fields", in: "admin.vm.List+ dom0 dom0\x00", wantErr: true},
		{name: "bad dest type", in: "admin.vm.List+ dom0 uuid dom0\x00", wantErr: true},
		{name: "keyword other", in: "admin.vm.List+ dom0 keyword dom0\x00", wantErr: true},
		{name: "empty", in: "", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := DecodeRequest([]byte(tt.in))
			if tt.wantErr {
				if !errors.Is(err, ErrFraming) {
					t.Fatalf("err = %v, want ErrFraming", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if r.Method != tt.method || r.Arg != tt.arg || r.Source != tt.src || r.Dest != tt.dest || string(r.Payload) != tt.payload {
				t.Fatalf("got %+v", r)
			}
		})
	}
}

func TestDecodeRequestSizeLimit(t *testing.T) {
	head := []byte("admin.vm.feature.Set+f dom0 name work\x00")
	exact := append(head, bytes.Repeat([]byte("x"), MaxRequest-len(head))...)
	if _, err := DecodeRequest(exact); err != nil {
		t.Fatalf("exactly %d bytes rejected: %v", MaxRequest, err)
	}
	if _, err := DecodeRequest(append(exact, 'x')); err == nil {
		t.Fatal("request over the limit accepted")
	}
}

func TestFrames(t *testing.T) {
	if got := string(AppendOK(nil, []byte("a\nb"))); got != "0\x00a\nb" {
		t.Errorf("ok frame %q", got)
	}
	if got := string(AppendException(nil, "ProtocolError", "unexpected argument")); got != "2\x00ProtocolError\x00\x00unexpected argument\x00" {
		t.Errorf("exception frame %q", got)
	}
	if got := string(AppendEvent(nil, "", "connection-established")); got != "1\x00\x00connection-established\x00\x00" {
		t.Errorf("event frame %q", got)
	}
	want := "1\x00work\x00property-set:label\x00name\x00label\x00newvalue\x00green\x00oldvalue\x00red\x00\x00"
	if got := string(AppendEvent(nil, "work", "property-set:label", "name", "label", "newvalue", "green", "oldvalue", "red")); got != want {
		t.Errorf("event frame %q", got)
	}
}

func FuzzDecodeRequest(f *testing.F) {
	for _, s := range []string{"admin.vm.List+ dom0 name dom0\x00", "admin.vm.List+ dom0 keyword adminvm\x00", "m+a+b s name d e\x00p\x00q", "", "\x00", "a b c d"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, buf []byte) {
		r, err := DecodeRequest(buf)
		if err != nil {
			return
		}
		// Whatever is accepted re-encodes to a request that decodes the same.
		dt := "name"
		var enc []byte
		enc = append(enc, r.Method...)
		if r.Arg != "" || bytes.IndexByte(buf[:bytes.IndexByte(buf, 0)], '+') >= 0 {
			enc = append(append(enc, '+'), r.Arg...)
		}
		enc = append(append(append(append(append(enc, ' '), r.Source...), ' '), dt...), ' ')
		enc = append(append(append(enc, r.Dest...), 0), r.Payload...)
		r2, err := DecodeRequest(enc)
		if err != nil {
			t.Fatalf("re-encoded %q rejected: %v", enc, err)
		}
		if r2.Method != r.Method || r2.Arg != r.Arg || r2.Source != r.Source || r2.Dest != r.Dest || !bytes.Equal(r2.Payload, r.Payload) {
			t.Fatalf("re-decode differs: %+v vs %+v", r2, r)
		}
		if bytes.IndexByte([]byte(r.Method+r.Arg+r.Source), 0) >= 0 || bytes.IndexByte([]byte(r.Method+r.Source), ' ') >= 0 {
			t.Fatalf("header field holds NUL or space: %+v", r)
		}
	})
}

func TestParseReply(t *testing.T) {
	ok, err := ParseReply(AppendOK(nil, []byte("a\x00b")))
	if err != nil || ok.Status != envelope.StatusOK || string(ok.Content) != "a\x00b" {
		t.Fatalf("ok: %+v %v", ok, err)
	}
	ex, err := ParseReply(AppendException(nil, "QubesVMNotFoundError", "No such domain: 'x'"))
	if err != nil || ex.Status != envelope.StatusException || ex.Exception.Class != "QubesVMNotFoundError" || ex.Exception.Message != "No such domain: 'x'" {
		t.Fatalf("exception: %+v %v", ex, err)
	}
	for _, bad := range []string{"", "1\x00\x00x\x00\x00", "2\x00Class\x00\x00msg", "2\x00\x00\x00msg\x00"} {
		if _, err := ParseReply([]byte(bad)); !errors.Is(err, ErrNotAReply) {
			t.Errorf("%q: err = %v, want ErrNotAReply", bad, err)
		}
	}
}
