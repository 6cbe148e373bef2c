package subject

import (
	"errors"
	"strings"
	"testing"
)

func TestEscapeToken(t *testing.T) {
	tests := []struct{ in, want string }{
		{"work", "work"},
		{"sys-net", "sys-net"},
		{"service.crond", "service%2Ecrond"},
		{"property-set:netvm", "property-set:netvm"},
		{"a*b>c", "a%2Ab%3Ec"},
		{"100%", "100%25"},
		{"tab\there", "tab%09here"},
		{"_app", "%5Fapp"},
		{"x_y", "x_y"},
		{"", "%"},
		{"\xff", "%FF"},
	}
	for _, tt := range tests {
		got := EscapeToken(tt.in)
		if got != tt.want {
			t.Errorf("EscapeToken(%q) = %q, want %q", tt.in, got, tt.want)
		}
		back, err := UnescapeToken(got)
		if err != nil || back != tt.in {
			t.Errorf("UnescapeToken(%q) = %q, %v; want %q", got, back, err, tt.in)
		}
	}
}

func TestUnescapeTokenRejects(t *testing.T) {
	for _, bad := range []string{"a.b", "%2", "%G0", "%41", "_app", "a b", "%2e"} {
		if _, err := UnescapeToken(bad); !errors.Is(err, ErrBadEscape) {
			t.Errorf("UnescapeToken(%q) error = %v, want ErrBadEscape", bad, err)
		}
	}
}

func TestEventSubjectRoundTrip(t *testing.T) {
	h := ForHost("lab.host-1")
	for _, tc := range []struct{ vm, ev string }{{"work", "property-set:netvm"}, {"", "domain-add"}, {"my.vm", "domain-feature-set:a.b"}, {"work", "property-set:"}, {"work", "domain-qdb-change:/a:b"}} {
		s := h.Event(tc.vm, tc.ev)
		if want := 5 + min(1, strings.Count(tc.ev, ":")); strings.Count(s, ".") != want {
			t.Fatalf("Event(%q,%q) = %q: want %d tokens", tc.vm, tc.ev, s, want+1)
		}
		host, vm, ev, ok := ParseEvent(s)
		if !ok || host != "lab.host-1" || vm != tc.vm || ev != tc.ev {
			t.Errorf("ParseEvent(%q) = %q %q %q %v", s, host, vm, ev, ok)
		}
	}
}

func FuzzEscapeToken(f *testing.F) {
	for _, s := range []string{"", "work", "a.b", "_app", "%", "x y", "\x00\xff", "property-set:label"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		tok := EscapeToken(s)
		if tok == "" || tok == GlobalVM || strings.ContainsAny(tok, ".*> \t\r\n") {
			t.Fatalf("EscapeToken(%q) = %q is not a plain token", s, tok)
		}
		for i := 0; i < len(tok); i++ {
			if tok[i] <= ' ' || tok[i] >= 0x7f {
				t.Fatalf("EscapeToken(%q) = %q has byte %#x", s, tok, tok[i])
			}
		}
		back, err := UnescapeToken(tok)
		if err != nil || back != s {
			t.Fatalf("round trip %q -> %q -> %q, %v", s, tok, back, err)
		}
		// Unescape accepts only canonical tokens, so escaping is a bijection.
		if u, err := UnescapeToken(s); err == nil && EscapeToken(u) != s {
			t.Fatalf("UnescapeToken(%q) = %q, which escapes to %q", s, u, EscapeToken(u))
		}
	})
}
