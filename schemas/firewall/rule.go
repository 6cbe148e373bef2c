// Package firewall is a qube's firewall as qubesd keeps it: rules parsed and checked
// from the Admin API text exactly as qubes/firewall.py does (Parse), printed back in
// its order (Rule.API), stored in its firewall.xml format version 2 (Marshal,
// Unmarshal), and the entries a netvm's QubesDB gets under /qubes-firewall/<ip>/
// (QubesDB). The package is pure: no I/O, no clock (callers pass the time).
package firewall

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"
)

// ErrInvalid is wrapped by every error of a rule qubesd refuses. qubesd raises a bare
// Python ValueError (the call is aborted); the message here says why.
var ErrInvalid = errors.New("invalid firewall rule")

// Destination types (the key qubesd prints for a destination).
const (
	Dst4    = "dst4"
	Dst6    = "dst6"
	DstHost = "dsthost"
)

// Rule is one firewall rule. Empty fields are unset. Values are kept as qubesd keeps
// them: Dst is the address text with its prefix length (a bare address gains /32 or
// /128), DstPorts is "N" or "N-M" as qubesd normalises it, ICMPType the decimal
// number, Expire the text given (digits).
type Rule struct {
	Action        string // accept | drop (required)
	Proto         string // tcp | udp | icmp
	DstType       string // Dst4, Dst6 or DstHost when Dst is set
	Dst           string
	DstPorts      string
	ICMPType      string
	SpecialTarget string // dns
	Expire        string // unix time
	Comment       string
}

// valueSafe are the characters qubesd's RuleOption accepts in a value.
func valueSafe(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !isAlnum(c) && !strings.ContainsRune(":;,./-_[]", rune(c)) {
			return false
		}
	}
	return true
}

func commentSafe(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !isAlnum(c) && !strings.ContainsRune(":;,./-_[] ", rune(c)) {
			return false
		}
	}
	return true
}

func isAlnum(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9'
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

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, args...))
}

// ParseRules parses an admin.vm.firewall.Set payload: one rule per line, split as
// Python's str.splitlines splits ASCII text. The payload must be ASCII (the caller
// answers qubesd's ProtocolError otherwise). Any invalid line fails the whole set.
func ParseRules(payload string) ([]Rule, error) {
	var rules []Rule
	for i, line := range splitLines(payload) {
		r, err := Parse(line)
		if err != nil {
			return nil, fmt.Errorf("line %d: %w", i+1, err)
		}
		rules = append(rules, r)
	}
	return rules, nil
}

// splitLines is Python's str.splitlines on ASCII text: \n, \r, \r\n, \v, \f, \x1c,
// \x1d, \x1e end a line; a final line end adds no empty line.
func splitLines(s string) []string {
	var out []string
	start := 0
	for i := 0; i < len(s); i++ {
		switch s[i] {
		case '\n', '\v', '\f', 0x1c, 0x1d, 0x1e:
			out = append(out, s[start:i])
			start = i + 1
		case '\r':
			out = append(out, s[start:i])
			if i+1 < len(s) && s[i+1] == '\n' {
				i++
			}
			start = i + 1
		}
	}
	if start < len(s) {
		out = append(out, s[start:])
	}
	return out
}

// pyWhitespace is what Python's str.strip() removes from ASCII text.
const pyWhitespace = " \t\n\r\v\f\x1c\x1d\x1e\x1f"

// Parse parses one rule line as qubesd's Rule.from_api_string: everything after the
// first "comment=" is the comment; the rest, stripped, is "key=value" options separated
// by single spaces.
func Parse(line string) (Rule, error) {
	var r Rule
	opts, comment, hasComment := strings.Cut(line, "comment=")
	if hasComment && comment != "" {
		if !commentSafe(comment) {
			return Rule{}, invalid("strange characters in comment")
		}
		r.Comment = comment
	}
	set := map[string]bool{}
	if r.Comment != "" {
		set["comment"] = true
	}
	for _, opt := range strings.Split(strings.Trim(opts, pyWhitespace), " ") {
		key, value, ok := strings.Cut(opt, "=")
		if !ok {
			return Rule{}, invalid("option %q is not key=value", opt)
		}
		if set[key] {
			return Rule{}, invalid("option '%s' already set", key)
		}
		var err error
		switch key {
		case "action":
			err = choice(&r.Action, value, "accept", "drop")
		case "proto":
			err = choice(&r.Proto, value, "tcp", "udp", "icmp")
		case "specialtarget":
			err = choice(&r.SpecialTarget, value, "dns")
		case "dstports":
			r.DstPorts, err = parsePorts(value)
		case "icmptype":
			r.ICMPType, err = parseICMPType(value)
		case "expire":
			r.Expire, err = parseExpire(value)
		case "dsthost", "dst4", "dst6", "dstname":
			if key != "dsthost" && set["dsthost"] {
				return Rule{}, invalid("option 'dsthost' already set")
			}
			key = "dsthost"
			r.DstType, r.Dst, err = parseDst(value)
		case "comment":
			// Unreachable: the first "comment=" starts the comment.
			err = invalid("comment must be the last option")
		default:
			err = invalid("unknown firewall option %q", key)
		}
		if err != nil {
			return Rule{}, err
		}
		set[key] = true
	}
	if err := r.check(); err != nil {
		return Rule{}, err
	}
	return r, nil
}

// check is what qubesd's Rule constructor checks once every option is set.
func (r Rule) check() error {
	switch {
	case r.DstPorts != "" && r.Proto != "tcp" && r.Proto != "udp":
		return invalid("dstports valid only for 'tcp' and 'udp' protocols")
	case r.ICMPType != "" && r.Proto != "icmp":
		return invalid("icmptype valid only for 'icmp' protocol")
	case r.Action == "":
		return invalid("action is required")
	}
	return nil
}

func choice(dst *string, value string, allowed ...string) error {
	if !valueSafe(value) {
		return invalid("strange characters in rule")
	}
	for _, a := range allowed {
		if value == a {
			*dst = value
			return nil
		}
	}
	return invalid("%q is not one of %s", value, strings.Join(allowed, ", "))
}

// pyInt is Python's int() of ASCII text in base 10: surrounding whitespace, one sign,
// digits with single underscores between them.
func pyInt(s string) (int64, bool) {
	s = strings.Trim(s, pyWhitespace)
	neg := false
	if s != "" && (s[0] == '+' || s[0] == '-') {
		neg = s[0] == '-'
		s = s[1:]
	}
	if s == "" || s[0] == '_' || s[len(s)-1] == '_' || strings.Contains(s, "__") {
		return 0, false
	}
	s = strings.ReplaceAll(s, "_", "")
	if !isDigits(s) {
		return 0, false
	}
	s = strings.TrimLeft(s, "0")
	if len(s) > 9 {
		s = "1000000000" // out of every range checked here
	}
	if s == "" {
		return 0, true
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return 0, false
	}
	if neg {
		n = -n
	}
	return n, true
}

// parsePorts is qubesd's DstPorts: "N" or "N-M" (each as Python's int() reads it),
// 0 ≤ N ≤ M ≤ 65535; kept as "N" or "N-M".
func parsePorts(value string) (string, error) {
	lo, hi, rng := strings.Cut(value, "-")
	if rng && strings.Contains(hi, "-") {
		return "", invalid("bad port range %q", value)
	}
	if !rng {
		hi = lo
	}
	a, okA := pyInt(lo)
	b, okB := pyInt(hi)
	switch {
	case !okA || !okB:
		return "", invalid("bad port %q", value)
	case a < 0 || a >= 65536 || b < 0 || b >= 65536:
		return "", invalid("ports out of range")
	case a > b:
		return "", invalid("invalid port range")
	}
	if a == b {
		return strconv.FormatInt(a, 10), nil
	}
	return strconv.FormatInt(a, 10) + "-" + strconv.FormatInt(b, 10), nil
}

func parseICMPType(value string) (string, error) {
	if len(value) > 3 || !isDigits(value) {
		return "", invalid("bad ICMP type")
	}
	n, _ := strconv.Atoi(value)
	if n > 255 {
		return "", invalid("ICMP type out of range")
	}
	return strconv.Itoa(n), nil
}

// maxExpire is the last second Python's datetime can hold (9999-12-31 23:59:59 UTC);
// qubesd fails on later times.
const maxExpire = 253402300799

func parseExpire(value string) (string, error) {
	if !valueSafe(value) {
		return "", invalid("strange characters in rule")
	}
	if !isDigits(value) {
		return "", invalid("bad expiration time")
	}
	n, err := strconv.ParseInt(strings.TrimLeft(value, "0")+"0", 10, 64)
	if err != nil || n/10 > maxExpire {
		return "", invalid("expiration time out of range")
	}
	return value, nil
}

// parseDst is qubesd's DstHost: an IPv6 or IPv4 address with an optional prefix
// length, or a host name of [a-z0-9-._]. The type follows the value, whatever key
// named it.
func parseDst(value string) (typ, dst string, err error) {
	host, prefix, hasPrefix := strings.Cut(value, "/")
	if strings.Contains(prefix, "/") {
		return "", "", invalid("too many /: %s", value)
	}
	if !hasPrefix {
		switch {
		case isIPv6(value):
			typ, dst = Dst6, value+"/128"
		case isIPv4(value):
			typ, dst = Dst4, value+"/32"
		default:
			for i := 0; i < len(value); i++ {
				c := value[i]
				if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-' || c == '.' || c == '_') {
					return "", "", invalid("invalid hostname")
				}
			}
			typ, dst = DstHost, value
		}
	} else {
		if !isDigits(prefix) {
			return "", "", invalid("bad prefix length")
		}
		n, err := strconv.Atoi(strings.TrimLeft(prefix, "0") + "0")
		n /= 10
		switch {
		case err != nil && isIPv6(host):
			return "", "", invalid("netmask for IPv6 must be <= 128")
		case err != nil && isIPv4(host):
			return "", "", invalid("netmask for IPv4 must be <= 32")
		case isIPv6(host):
			if n > 128 {
				return "", "", invalid("netmask for IPv6 must be <= 128")
			}
			typ = Dst6
		case isIPv4(host):
			if n > 32 {
				return "", "", invalid("netmask for IPv4 must be <= 32")
			}
			typ = Dst4
		default:
			return "", "", invalid("invalid IP address: %s", host)
		}
		dst = value
	}
	if !valueSafe(dst) {
		return "", "", invalid("strange characters in rule")
	}
	return typ, dst, nil
}

// isIPv6 is inet_pton(AF_INET6): no zone.
func isIPv6(s string) bool {
	if !strings.Contains(s, ":") || strings.Contains(s, "%") {
		return false
	}
	a, err := netip.ParseAddr(s)
	return err == nil && a.Is6()
}

// isIPv4 is inet_pton(AF_INET): exactly four decimal parts 0-255, no leading zeros.
func isIPv4(s string) bool {
	a, err := netip.ParseAddr(s)
	return err == nil && a.Is4()
}

// Expired reports whether the rule has an expiry time before now.
func (r Rule) Expired(now time.Time) bool {
	if r.Expire == "" {
		return false
	}
	n, err := strconv.ParseInt(strings.TrimLeft(r.Expire, "0")+"0", 10, 64)
	return err == nil && n/10 < now.Unix()
}

// field is one set option in qubesd's property order: (order, name), with the comment
// moved to the end for the API text.
type field struct{ key, value string }

func (r Rule) fields() []field {
	var out []field
	add := func(k, v string) {
		if v != "" {
			out = append(out, field{k, v})
		}
	}
	add("action", r.Action)
	add("expire", r.Expire)
	if r.Dst != "" || r.DstType != "" {
		out = append(out, field{"dsthost", r.Dst})
	}
	add("proto", r.Proto)
	add("specialtarget", r.SpecialTarget)
	add("dstports", r.DstPorts)
	add("icmptype", r.ICMPType)
	add("comment", r.Comment)
	return out
}

// dstports prints as N-M always.
func portsRange(p string) string {
	if strings.Contains(p, "-") {
		return p
	}
	return p + "-" + p
}

// API is the rule as admin.vm.firewall.Get prints it (qubesd's api_rule).
func (r Rule) API() string {
	var parts []string
	for _, f := range r.fields() {
		switch f.key {
		case "dsthost":
			parts = append(parts, r.DstType+"="+f.value)
		case "dstports":
			parts = append(parts, "dstports="+portsRange(f.value))
		default:
			parts = append(parts, f.key+"="+f.value)
		}
	}
	return strings.Join(parts, " ")
}

// QubesDB is the rule as a netvm's QubesDB holds it (qubesd's rule: no expiry and no
// comment).
func (r Rule) QubesDB() string {
	var parts []string
	for _, f := range r.fields() {
		switch f.key {
		case "expire", "comment":
		case "dsthost":
			parts = append(parts, r.DstType+"="+f.value)
		case "dstports":
			parts = append(parts, "dstports="+portsRange(f.value))
		default:
			parts = append(parts, f.key+"="+f.value)
		}
	}
	return strings.Join(parts, " ")
}

// Get is the admin.vm.firewall.Get answer: each rule not expired at now, one a line.
func Get(rules []Rule, now time.Time) string {
	var b strings.Builder
	for _, r := range rules {
		if !r.Expired(now) {
			b.WriteString(r.API())
			b.WriteByte('\n')
		}
	}
	return b.String()
}

// Default is the rule set of a qube without firewall.xml: accept everything.
func Default() []Rule { return []Rule{{Action: "accept"}} }

// QubesDB returns the entries qubesd writes for a qube's rules under
// /qubes-firewall/<ip>/ of its netvm: "policy" (always drop) and one "NNNN" key per
// rule not expired at now, numbered by position, leaving out rules for the other
// address family (family 4 or 6; 0 keeps both).
func QubesDB(rules []Rule, family int, now time.Time) map[string]string {
	out := map[string]string{"policy": "drop"}
	exclude := ""
	switch family {
	case 4:
		exclude = Dst6
	case 6:
		exclude = Dst4
	}
	for i, r := range rules {
		if r.Expired(now) || (exclude != "" && r.DstType == exclude) {
			continue
		}
		out[fmt.Sprintf("%04d", i)] = r.QubesDB()
	}
	return out
}
