package cloudevent

import (
	"context"
	"encoding/json"
	"maps"
	"reflect"
	"slices"
	"testing"
	"time"
	"unicode/utf8"
)

// The hand-written binary mode must write exactly what the SDK writes for the same
// event: every header, every value, the data.
func TestEncodeBinaryMatchesTheSDK(t *testing.T) {
	ctx := context.Background()
	at := time.Date(2026, 12, 3, 18, 23, 44, 831528240, time.FixedZone("x", 3600))
	events := []Event{
		New("work", "domain-feature-set:x", "feature", "x", "value", "a\"b\u00e9\x01<>&\\\u2028", "oldvalue", ""),
		New("", "domain-add", "vm", "x"),
		New("sys-net", "domain-start"),
		New("work", "property-set:label", "name", "label", "newvalue", "green", "oldvalue", "red"),
		New("work", "domain-tag-add:a!#$%'()*+,-./09:;=?@[]^_`{|}~", "tag", "a!#$%'()*+,-./09:;=?@[]^_`{|}~"),
		New("work", "x", "k\xff\xfe", "v\t\n\r\b\f"),
	}
	for _, host := range []string{"h1", "lab-0001", "dom0.example_1"} {
		if !plainHostID(host) {
			t.Fatalf("%q is plain", host)
		}
		for _, e := range events {
			want, err := encodeSDK(ctx, host, e, "kFxb7l1ktDzDyXJ2v4UDRd", at)
			if err != nil {
				t.Fatal(err)
			}
			got := encodeBinary(host, e, "kFxb7l1ktDzDyXJ2v4UDRd", at)
			if got.Subject != want.Subject {
				t.Errorf("%s: subject %q, the SDK's %q", e.Name, got.Subject, want.Subject)
			}
			if !maps.EqualFunc(got.Header, want.Header, slices.Equal[[]string]) {
				t.Errorf("%s: headers\n%q\nthe SDK's\n%q", e.Name, got.Header, want.Header)
			}
			if string(got.Data) != string(want.Data) {
				t.Errorf("%s: data %q, the SDK's %q", e.Name, got.Data, want.Data)
			}
			out, _, err := Decode(ctx, got)
			if err != nil {
				t.Fatalf("%s: SDK decode: %v", e.Name, err)
			}
			// Invalid UTF-8 is sent as U+FFFD, as json.Marshal does: otherwise the
			// event comes back as it went.
			if want, _, _ := Decode(ctx, want); !reflect.DeepEqual(out, want) || validUTF8(e) && !reflect.DeepEqual(out, e) {
				t.Errorf("%s: SDK decode %+v, want %+v", e.Name, out, e)
			}
		}
	}
	for _, host := range []string{"", "a b", "%zz", "h/1", "ü"} {
		if plainHostID(host) {
			t.Errorf("%q is not plain: the SDK must check it", host)
		}
	}
}

func validUTF8(e Event) bool {
	for _, kv := range e.Kwargs {
		if !utf8.ValidString(kv.Key) || !utf8.ValidString(kv.Value) {
			return false
		}
	}
	return true
}

func FuzzJSONString(f *testing.F) {
	for _, s := range []string{"", "plain", "a\"b", "<&>", "\u2028\u2029", "\xff", "\x00\x1f\x7f", "é"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		want, _ := json.Marshal(s)
		if got := appendJSONString([]byte("x"), s); string(got) != "x"+string(want) {
			t.Fatalf("%q: %s, json.Marshal %s", s, got[1:], want)
		}
	})
}

func BenchmarkEncode(b *testing.B) {
	ctx := context.Background()
	e := New("work", "domain-feature-set:bench", "feature", "bench", "value", "1", "oldvalue", "0")
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Encode(ctx, "h1", e); err != nil {
			b.Fatal(err)
		}
	}
}
