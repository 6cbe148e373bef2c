package cloudevent

import (
	"context"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/qubesbus/qubesbus/bus/subject"
)

// longNameEvents are events whose names do not fit a header or a subject token: a
// client may choose tag and feature names of up to 64 KiB, of any ASCII but space and
// NUL (feature.Remove does not validate the name it announces).
func longNameEvents() []Event {
	tag := strings.Repeat("t", 60<<10)
	feat := strings.Repeat("f.", 30<<10)
	weird := "a\r\nb\tc\x01:d\x7f "
	return []Event{
		New("personal", "domain-tag-add:"+tag, "tag", tag),
		New("work", "domain-feature-set:"+feat, "feature", feat, "value", "1"),
		New("work", "domain-feature-pre-delete:"+weird, "feature", weird),
		New("work", "domain-feature-pre-delete:"+strings.Repeat("\x01", 30<<10), "feature", strings.Repeat("\x01", 30<<10)),
		New(strings.Repeat("q", 2000), "domain-start"),
		New("", "domain-tag-add:"+strings.Repeat("x", MaxHeaderName+1), "tag", "x"),
	}
}

func TestLongNamesTravelExactly(t *testing.T) {
	ctx := context.Background()
	for _, in := range longNameEvents() {
		msg, err := Encode(ctx, "h1", in)
		if err != nil {
			t.Fatalf("%s: %v", LogName(in.Name), err)
		}
		if len(msg.Subject) > subject.MaxEventSubject {
			t.Errorf("%s: subject of %d bytes", LogName(in.Name), len(msg.Subject))
		}
		if _, _, _, ok := subject.ParseEvent(msg.Subject); ok && (len(in.Name) > subject.MaxToken || len(in.VM) > subject.MaxToken) {
			t.Errorf("%s: ParseEvent read a hashed subject %q", LogName(in.Name), msg.Subject)
		}
		size := 0
		for k, vs := range msg.Header {
			for _, v := range vs {
				size += len(k) + len(v) + 4
				if !HeaderSafe(v) && k != contentTypeHeader {
					t.Errorf("%s: header %s = %q is not header-safe", LogName(in.Name), k, LogName(v))
				}
			}
		}
		if size > 4096 {
			t.Errorf("%s: %d bytes of headers", LogName(in.Name), size)
		}
		if msg.Header.Get(contentTypeHeader) != StructuredContentType || msg.Header.Get("ce-specversion") != "" {
			t.Errorf("%s: not in structured mode: %v", LogName(in.Name), msg.Header)
		}
		out, ev, err := Decode(ctx, msg)
		if err != nil || !reflect.DeepEqual(out, in) {
			t.Fatalf("%s: Decode = %+v, %v", LogName(in.Name), LogName(out.Name), err)
		}
		if fast, err := DecodeHeaders(msg); err != nil || !reflect.DeepEqual(fast, in) {
			t.Fatalf("%s: DecodeHeaders = %s, %v", LogName(in.Name), LogName(fast.Name), err)
		}
		if HostOf(ev) != "h1" || !strings.HasPrefix(ev.Type(), TypePrefix) || len(ev.Type()) > len(TypePrefix)+2*subject.MaxToken+1 {
			t.Errorf("%s: host %q, type %q", LogName(in.Name), HostOf(ev), LogName(ev.Type()))
		}
	}
	// Names that fit stay in binary mode, byte for byte as before.
	for _, in := range []Event{New("work", "domain-feature-set:"+strings.Repeat("f", MaxHeaderName-len("domain-feature-set:")), "feature", "f"),
		New("work", "property-set:netvm", "name", "netvm")} {
		msg, err := Encode(ctx, "h1", in)
		if err != nil {
			t.Fatal(err)
		}
		if msg.Header.Get("ce-qubesevent") != in.Name || msg.Header.Get("ce-type") != TypePrefix+in.Name || msg.Header.Get(contentTypeHeader) != "" {
			t.Errorf("%s: headers %v", LogName(in.Name), msg.Header)
		}
	}
}

// Long names are stored by JetStream (headers under its 64 KiB limit, subject bounded)
// and read back exactly.
func TestPublishLongNames(t *testing.T) {
	ctx, nc, s, p := withStream(t, 20*time.Second)
	evs := longNameEvents()
	if err := p.Publish(ctx, evs...); err != nil {
		t.Fatal(err)
	}
	if err := p.Publish(ctx, evs[0]); err != nil { // alone: the synchronous path
		t.Fatal(err)
	}
	for i, want := range append(evs, evs[0]) {
		raw, err := s.GetMsg(ctx, uint64(i+1))
		if err != nil {
			t.Fatal(err)
		}
		got, _, err := Decode(ctx, rawToMsg(raw))
		if err != nil || !reflect.DeepEqual(got, want) {
			t.Fatalf("event %d: %s, %v", i, LogName(got.Name), err)
		}
	}
	if nc.Status() != nats.CONNECTED || nc.LastError() != nil {
		t.Fatalf("connection %v, last error %v", nc.Status(), nc.LastError())
	}
}
