package subject

import "testing"

func TestKVToken(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"", "="},
		{"4d2f8e6a-1b3c", "4d2f8e6a-1b3c"},
		{"Host_1", "Host_1"},
		{"a.b", "a=2Eb"},
		{"a=2Eb", "a=3D2Eb"},
		{"a b/c*>", "a=20b=2Fc=2A=3E"},
		{"é", "=C3=A9"},
	} {
		if got := KVToken(tc.in); got != tc.want {
			t.Errorf("KVToken(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
	for _, name := range []string{"", "sys-net", "my.qube", "a=b", "_x", "dom0", "caf\xc3\xa9", "a b>*"} {
		k := KVToken(name)
		for i := 0; i < len(k); i++ {
			c := k[i]
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '=') {
				t.Errorf("KVToken(%q) = %q: byte %q not allowed in one key token", name, k, c)
			}
		}
		if back, ok := ParseKVToken(k); !ok || back != name {
			t.Errorf("ParseKVToken(KVToken(%q)) = %q, %v", name, back, ok)
		}
	}
	for _, bad := range []string{"=4", "=ZZ", "a="} {
		if _, ok := ParseKVToken(bad); ok {
			t.Errorf("ParseKVToken(%q) accepted", bad)
		}
	}
}
