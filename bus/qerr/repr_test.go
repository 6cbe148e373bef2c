package qerr

import "testing"

func TestRepr(t *testing.T) {
	tests := []struct{ in, want string }{
		{"admin.vm.Nope", `'admin.vm.Nope'`},
		{"", `''`},
		{"it's", `"it's"`},
		{`both ' and "`, `'both \' and "'`},
		{`back\slash`, `'back\\slash'`},
		{"a\tb\nc\rd", `'a\tb\nc\rd'`},
		{"\x00\x1f\x7f", `'\x00\x1f\x7f'`},
		{"'', 'preload'", `"'', 'preload'"`},
	}
	for _, tt := range tests {
		if got := Repr(tt.in); got != tt.want {
			t.Errorf("Repr(%q) = %s, want %s", tt.in, got, tt.want)
		}
	}
}
