package model

import (
	"net/netip"
	"regexp"
	"strconv"
	"strings"

	"github.com/qubesbus/qubesbus/bus/qerr"
)

// Kind is the parser a property applies to untrusted text before its setter.
type Kind uint8

const (
	KindStr  Kind = iota // printable ASCII
	KindBool             // 1 yes true on / 0 no false off
	KindInt              // Python int()
	KindIPv4
	KindIPv6
	KindUUID
	KindVM // a qube name, or empty for none
)

func (k Kind) parserName() string {
	switch k {
	case KindInt:
		return "int"
	case KindIPv4:
		return "IPv4Address"
	case KindIPv6:
		return "IPv6Address"
	case KindUUID:
		return "UUID"
	}
	return ""
}

func isASCII(b []byte) bool {
	for _, c := range b {
		if c >= 0x80 {
			return false
		}
	}
	return true
}

// IsPrintable reports whether every byte is in Python's string.printable.
func IsPrintable(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if (c < 0x20 || c > 0x7e) && c != '\t' && c != '\n' && c != '\r' && c != '\x0b' && c != '\x0c' {
			return false
		}
	}
	return true
}

// ParseBool parses qubesd's bool text (case-insensitive, no trimming).
func ParseBool(s string) (bool, error) {
	switch strings.ToLower(s) {
	case "1", "yes", "true", "on":
		return true, nil
	case "0", "no", "false", "off":
		return false, nil
	}
	return false, qerr.ValueError("Invalid literal for boolean property: " + qerr.Repr(s))
}

func isPySpace(c byte) bool {
	return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\x0b' || c == '\x0c'
}

// ParseBigInt parses decimal text as Python's int() does (surrounding whitespace, one
// sign, digits with single underscores between them), with Python's arbitrary
// precision, and returns the canonical text str() gives the result: no '+', no
// underscores, no leading zeros, "0" for any zero.
func ParseBigInt(s string) (string, bool) {
	neg, digits, ok := splitPyInt(s)
	if !ok {
		return "", false
	}
	digits = strings.TrimLeft(digits, "0")
	if digits == "" {
		return "0", true
	}
	if neg {
		return "-" + digits, true
	}
	return digits, true
}

// IntSign is the sign (-1, 0, 1) of canonical integer text (ParseBigInt's output).
func IntSign(text string) int {
	switch {
	case text == "0" || text == "":
		return 0
	case text[0] == '-':
		return -1
	}
	return 1
}

// splitPyInt checks the syntax of Python's int() and returns the sign and the digits
// without underscores.
func splitPyInt(s string) (neg bool, digits string, ok bool) {
	i, j := 0, len(s)
	for i < j && isPySpace(s[i]) {
		i++
	}
	for j > i && isPySpace(s[j-1]) {
		j--
	}
	s = s[i:j]
	if s != "" && (s[0] == '+' || s[0] == '-') {
		neg = s[0] == '-'
		s = s[1:]
	}
	if s == "" || s[0] == '_' || s[len(s)-1] == '_' || strings.Contains(s, "__") {
		return false, "", false
	}
	digits = strings.ReplaceAll(s, "_", "")
	for k := 0; k < len(digits); k++ {
		if digits[k] < '0' || digits[k] > '9' {
			return false, "", false
		}
	}
	return neg, digits, true
}

// ParseInt parses decimal text as Python's int() does; values outside int64 fail
// (ParseBigInt keeps them).
func ParseInt(s string) (int64, bool) {
	neg, digits, ok := splitPyInt(s)
	if !ok {
		return 0, false
	}
	n, err := strconv.ParseUint(digits, 10, 64)
	if err != nil || n > 1<<63 || (!neg && n == 1<<63) {
		return 0, false
	}
	if neg {
		return -int64(n), true
	}
	return int64(n), true
}

// ParseIPv4 parses a dotted quad (no leading zeros) and returns its canonical text.
func ParseIPv4(s string) (string, bool) {
	if strings.ContainsAny(s, ":%") {
		return "", false
	}
	a, err := netip.ParseAddr(s)
	if err != nil || !a.Is4() {
		return "", false
	}
	return a.String(), true
}

// ParseIPv6 parses IPv6 text and returns its canonical text. A zone may hold printable
// characters other than '%' and space (a stricter rule than Python's, so a stored
// value can always be written to qubes.xml).
func ParseIPv6(s string) (string, bool) {
	addr, zone, hasZone := strings.Cut(s, "%")
	if hasZone {
		if zone == "" {
			return "", false
		}
		for i := 0; i < len(zone); i++ {
			if zone[i] <= ' ' || zone[i] > '~' || zone[i] == '%' {
				return "", false
			}
		}
	}
	if !strings.Contains(addr, ":") {
		return "", false
	}
	a, err := netip.ParseAddr(addr)
	if err != nil || !a.Is6() || a.Zone() != "" {
		return "", false
	}
	out := a.String()
	if hasZone {
		out += "%" + zone
	}
	return out, true
}

// ParseUUID parses UUID text as Python's uuid.UUID(hex) does (braces, hyphens and a
// urn:uuid: prefix allowed) and returns the canonical lowercase form.
func ParseUUID(s string) (string, bool) {
	s = strings.ReplaceAll(s, "urn:", "")
	s = strings.ReplaceAll(s, "uuid:", "")
	s = strings.Trim(s, "{}")
	s = strings.ReplaceAll(s, "-", "")
	if len(s) != 32 {
		return "", false
	}
	s = strings.ToLower(s)
	for i := 0; i < len(s); i++ {
		c := s[i]
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return "", false
		}
	}
	return s[0:8] + "-" + s[8:12] + "-" + s[12:16] + "-" + s[16:20] + "-" + s[20:32], true
}

var nameRe = regexp.MustCompile(`\A[a-zA-Z][a-zA-Z0-9_.-]*\z`)

// ValidateName applies qubesd's qube-name rules (docs/spec/protocol.md §3.2) in their
// order.
func ValidateName(name string) error {
	msg := ""
	switch {
	case len(name) > 31:
		msg = "VM name must be shorter than 32 characters"
	case name != "" && strings.IndexByte("0123456789_.-", name[0]) >= 0:
		msg = "VM name cannot start with hyphen, underscore, dot or numbers"
	case !nameRe.MatchString(name):
		msg = "VM name contains illegal characters"
	case name == "Domain-0":
		msg = "VM name cannot be 'Domain-0'"
	case name == "none" || name == "default":
		msg = "VM name cannot be 'none' nor 'default'"
	case strings.HasSuffix(name, "-dm"):
		msg = "VM name cannot end with -dm"
	default:
		return nil
	}
	return qerr.ValueError(msg)
}

var tagRe = regexp.MustCompile(`\A[a-zA-Z0-9_-]+\z`)

// ValidateTag applies qubesd's tag rule.
func ValidateTag(tag string) error {
	if tag == "" {
		return qerr.InvalidTagError("tag cannot be empty")
	}
	if !tagRe.MatchString(tag) {
		return qerr.InvalidTagError("disallowed characters")
	}
	return nil
}

// LabelSafeSet is the set of characters label names may use.
const LabelSafeSet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_."

// ValidateLabelName applies qubesd's label-name rules; creating adds "not all digits".
func ValidateLabelName(name string, creating bool) error {
	if name == "" {
		return qerr.InvalidLabelError("Label name must be set")
	}
	for i := 0; i < len(name); i++ {
		if strings.IndexByte(LabelSafeSet, name[i]) < 0 {
			return qerr.InvalidLabelError("Label must be in safe set: " + LabelSafeSet)
		}
	}
	if creating && isDigits(name) {
		return qerr.InvalidLabelError("Label must not be a digit")
	}
	return nil
}

func isDigits(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}
