package subject

import "strings"

// KVToken makes s one token of a key-value key, which allows only [-/_=.a-zA-Z0-9]:
// letters, digits, '-' and '_' stay, every other byte becomes "=XX" (upper-case hex),
// so '.' never splits a token and distinct inputs stay distinct. An empty s becomes
// "=" so that no token is empty. The buckets keyed by host and qube or backend name
// (notes, device records) use it.
func KVToken(s string) string {
	if s == "" {
		return "="
	}
	const hex = "0123456789ABCDEF"
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c == '_':
			b.WriteByte(c)
		default:
			b.WriteByte('=')
			b.WriteByte(hex[c>>4])
			b.WriteByte(hex[c&15])
		}
	}
	return b.String()
}

// ParseKVToken reverses KVToken; ok is false for a token KVToken cannot have made.
func ParseKVToken(t string) (s string, ok bool) {
	if t == "=" {
		return "", true
	}
	var b strings.Builder
	for i := 0; i < len(t); i++ {
		if t[i] != '=' {
			b.WriteByte(t[i])
			continue
		}
		if i+2 >= len(t) {
			return "", false
		}
		hi, lo := unhex(t[i+1]), unhex(t[i+2])
		if hi < 0 || lo < 0 {
			return "", false
		}
		b.WriteByte(byte(hi<<4 | lo))
		i += 2
	}
	return b.String(), true
}
