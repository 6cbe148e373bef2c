package devices

import "testing"

func TestRecordKeyEscape(t *testing.T) {
	for _, name := range []string{"", "sys-net", "my.qube", "a=b", "_x", "dom0", "caf\xc3\xa9", "a b>*"} {
		k := escapeKey(name)
		for i := 0; i < len(k); i++ {
			c := k[i]
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '=') {
				t.Errorf("escapeKey(%q) = %q: byte %q not allowed in one key token", name, k, c)
			}
		}
		if back, ok := unescapeKey(k); !ok || back != name {
			t.Errorf("unescapeKey(escapeKey(%q)) = %q, %v", name, back, ok)
		}
	}
	for _, bad := range []string{"=4", "=ZZ", "a="} {
		if _, ok := unescapeKey(bad); ok {
			t.Errorf("unescapeKey(%q) accepted", bad)
		}
	}
}
