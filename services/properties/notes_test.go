package properties

import "testing"

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
