package subject

import (
	"strings"
	"testing"
)

func TestTokenBoundsLongNames(t *testing.T) {
	short := strings.Repeat("a", MaxToken)
	if Token(short) != short {
		t.Fatalf("a name of MaxToken bytes changed: %q", Token(short))
	}
	// 43 dots escape to 129 bytes: hashed.
	dots := strings.Repeat(".", 43)
	for _, name := range []string{short + "a", dots, strings.Repeat("t", 60<<10), strings.Repeat("\x01", 64<<10)} {
		tok := Token(name)
		if len(tok) != HashedTokenLen || !isHashed(tok) {
			t.Errorf("Token(%d bytes) = %q: want a hashed token of %d bytes", len(name), tok, HashedTokenLen)
		}
		if _, err := UnescapeToken(tok); err == nil {
			t.Errorf("UnescapeToken(%q) read back a hashed token", tok)
		}
	}
	if Token(short+"a") == Token(short+"b") {
		t.Fatal("two long names share a token")
	}
	if Token(dots) != Token(dots) {
		t.Fatal("Token is not deterministic")
	}
	// The bug: a 60 KiB tag made a subject longer than NATS's control line.
	h := ForHost("local")
	tag := strings.Repeat("x", 60<<10)
	s := h.Event("personal", "domain-tag-add:"+tag)
	if len(s) > MaxEventSubject || !strings.HasPrefix(s, "qubes.v1.local.events.personal.domain-tag-add.%~xxxx") {
		t.Fatalf("subject %q (%d bytes)", s, len(s))
	}
	if _, _, _, ok := ParseEvent(s); ok {
		t.Fatalf("ParseEvent read a hashed subject")
	}
	// Normal names are unchanged, byte for byte.
	if got := h.Event("work", "domain-feature-set:service.crond"); got != "qubes.v1.local.events.work.domain-feature-set.service%2Ecrond" {
		t.Fatalf("subject of a normal name changed: %q", got)
	}
	if got := h.Cancel("zbjmzUpIQ67QOZUS67XDFR"); got != "qubes.v1.local.cancel.zbjmzUpIQ67QOZUS67XDFR" {
		t.Fatalf("cancel subject changed: %q", got)
	}
}

// checkSubject fails unless s is a valid, bounded NATS subject of n tokens: no empty
// token, no white space or control byte, and no wildcard token.
func checkSubject(t *testing.T, s string, n int) {
	t.Helper()
	if len(s) > MaxEventSubject {
		t.Fatalf("subject of %d bytes > %d: %q", len(s), MaxEventSubject, s)
	}
	for i := 0; i < len(s); i++ {
		if s[i] <= ' ' || s[i] >= 0x7f {
			t.Fatalf("subject %q has byte %#x", s, s[i])
		}
	}
	toks := strings.Split(s, ".")
	if len(toks) != n {
		t.Fatalf("subject %q has %d tokens, want %d", s, len(toks), n)
	}
	for _, tok := range toks {
		if tok == "" || tok == "*" || tok == ">" || len(tok) > MaxToken {
			t.Fatalf("subject %q has token %q", s, tok)
		}
	}
}

// FuzzSubjectTokens checks every builder that takes a name: whatever the names, the
// subject is bounded, plain, of the expected shape; a name that fits a token reads
// back exactly, and different names give different tokens.
func FuzzSubjectTokens(f *testing.F) {
	for _, s := range [][3]string{
		{"local", "work", "property-set:netvm"},
		{"lab.host-1", "", "domain-add"},
		{"h", "my.vm", "domain-feature-set:" + strings.Repeat("a.", 100)},
		{"h", "_app", "domain-tag-add:" + strings.Repeat("%", 50)},
		{strings.Repeat("h", 200), strings.Repeat("\x00", 43), "x:" + strings.Repeat("y", 5000)},
		{"h", "w", "property-set:"},
	} {
		f.Add(s[0], s[1], s[2], "other")
	}
	f.Fuzz(func(t *testing.T, host, vm, event, other string) {
		h := ForHost(host)
		if len(h.ID()) > MaxToken {
			t.Fatalf("host token of %d bytes", len(h.ID()))
		}
		s := h.Event(vm, event)
		base, suffix, two := strings.Cut(event, ":")
		n := 6
		if two {
			n = 7
		}
		checkSubject(t, s, n)
		filter, found := strings.CutSuffix(h.EventsOfFilter(vm), ".>")
		if !found {
			t.Fatalf("EventsOfFilter(%q) = %q", vm, h.EventsOfFilter(vm))
		}
		checkSubject(t, filter, 5)
		checkSubject(t, h.Cancel(event), 5)
		gh, gvm, gev, ok := ParseEvent(s)
		fits := len(EscapeToken(host)) <= MaxToken && (vm == "" || len(EscapeToken(vm)) <= MaxToken) &&
			len(EscapeToken(base)) <= MaxToken && (!two || len(EscapeToken(suffix)) <= MaxToken)
		if fits != ok || (ok && (gh != host || gvm != vm || gev != event)) {
			t.Fatalf("ParseEvent(%q) = %q %q %q %v; names fit: %v", s, gh, gvm, gev, ok, fits)
		}
		for _, name := range []string{host, vm, event, other} {
			tok := Token(name)
			if back, err := UnescapeToken(tok); len(EscapeToken(name)) <= MaxToken {
				if err != nil || back != name {
					t.Fatalf("Token(%q) = %q reads back as %q, %v", name, tok, back, err)
				}
			} else if err == nil || !isHashed(tok) || len(tok) != HashedTokenLen {
				t.Fatalf("Token of a long name = %q, not a hashed token", tok)
			}
			if tok == GlobalVM || tok == UnknownMethod {
				t.Fatalf("Token(%q) = reserved %q", name, tok)
			}
		}
		if other != vm && Token(other) == Token(vm) {
			t.Fatalf("names %q and %q share token %q", other, vm, Token(vm))
		}
	})
}

// isHashed reports whether tok is a hashed token (Token of a long name).
func isHashed(tok string) bool { return strings.HasPrefix(tok, hashedPrefix) }
