package subject

import (
	"errors"
	"fmt"
)

// ErrBadEscape is returned for a token that EscapeToken cannot have produced.
var ErrBadEscape = errors.New("subject: bad token escape")

// EscapeToken makes any string a single plain NATS subject token, reversibly. Qube and
// feature names may hold '.', event names hold ':'; NATS forbids '.', '*', '>' and
// whitespace inside a token. Those bytes, '%', every byte outside printable ASCII, and
// a leading '_' (so no escaped name can collide with the reserved "_app") become %XX.
// The empty string becomes "%" (a token cannot be empty).
func EscapeToken(s string) string {
	if s == "" {
		return "%"
	}
	n := 0
	for i := 0; i < len(s); i++ {
		if mustEscape(s[i], i) {
			n++
		}
	}
	if n == 0 {
		return s
	}
	buf := make([]byte, 0, len(s)+2*n)
	for i := 0; i < len(s); i++ {
		c := s[i]
		if mustEscape(c, i) {
			buf = append(buf, '%', hex[c>>4], hex[c&0xf])
		} else {
			buf = append(buf, c)
		}
	}
	return string(buf)
}

// UnescapeToken reverses EscapeToken.
func UnescapeToken(t string) (string, error) {
	switch t {
	case "%":
		return "", nil
	case "":
		return "", fmt.Errorf("%w: empty token", ErrBadEscape)
	}
	buf := make([]byte, 0, len(t))
	for i := 0; i < len(t); i++ {
		c := t[i]
		if c != '%' {
			if mustEscape(c, len(buf)) {
				return "", fmt.Errorf("%w: raw byte %#x in %q", ErrBadEscape, c, t)
			}
			buf = append(buf, c)
			continue
		}
		if i+2 >= len(t) {
			return "", fmt.Errorf("%w: short escape in %q", ErrBadEscape, t)
		}
		hi, lo := unhex(t[i+1]), unhex(t[i+2])
		if hi < 0 || lo < 0 {
			return "", fmt.Errorf("%w: bad hex in %q", ErrBadEscape, t)
		}
		b := byte(hi<<4 | lo)
		if !mustEscape(b, len(buf)) {
			return "", fmt.Errorf("%w: needless escape in %q", ErrBadEscape, t)
		}
		buf = append(buf, b)
		i += 2
	}
	return string(buf), nil
}

const hex = "0123456789ABCDEF"

func mustEscape(c byte, pos int) bool {
	switch {
	case c <= ' ' || c >= 0x7f:
		return true
	case c == '.' || c == '*' || c == '>' || c == '%':
		return true
	case c == '_' && pos == 0:
		return true
	}
	return false
}

func unhex(c byte) int {
	switch {
	case '0' <= c && c <= '9':
		return int(c - '0')
	case 'A' <= c && c <= 'F':
		return int(c - 'A' + 10)
	}
	return -1
}
