// Package policy decides which source qube may call which Admin API method on which
// destination, from rules in a format close to qrexec policy:
//
//	# method          argument   source     target      action
//	admin.vm.List      *          work       @adminvm    allow
//	admin.vm.property.Get +label  @tag:ops   @anyvm      allow
//	admin.*            *          @anyvm     @anyvm      deny
//
// method is a name or a prefix ending in '*'; argument is '*' or '+ARG' ('+' alone is
// the empty argument); source and target are a qube name, @anyvm, @adminvm, @tag:T or
// @type:Class; action is allow or deny. The first matching rule wins. With no match the
// answer is the default: dom0 may call everything, every other source is denied.
package policy

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/qubesbus/qubesbus/bus/rpc"
)

// Action is a rule's verdict.
type Action bool

const (
	Deny  Action = false
	Allow Action = true
)

// Qube is what a rule can match on.
type Qube struct {
	Name  string
	Class string
	Tags  []string
}

// Rule is one policy line.
type Rule struct {
	Line           int
	Method, Arg    string
	Source, Target string
	Action         Action
}

// Policy is an ordered rule list.
type Policy struct{ rules []Rule }

// ErrSyntax marks a policy file that cannot be parsed.
var ErrSyntax = errors.New("policy syntax error")

// Load reads a policy file.
func Load(path string) (*Policy, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("policy: %w", err)
	}
	defer f.Close()
	p, err := Parse(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return p, nil
}

// Parse reads rules, one per line; '#' starts a comment.
func Parse(r io.Reader) (*Policy, error) {
	p := &Policy{}
	sc := bufio.NewScanner(r)
	for n := 1; sc.Scan(); n++ {
		line, _, _ := strings.Cut(sc.Text(), "#")
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		if len(f) != 5 {
			return nil, fmt.Errorf("%w: line %d: want 5 fields (method argument source target action), got %d", ErrSyntax, n, len(f))
		}
		rule := Rule{Line: n, Method: f[0], Arg: f[1], Source: f[2], Target: f[3]}
		switch f[4] {
		case "allow":
			rule.Action = Allow
		case "deny":
			rule.Action = Deny
		default:
			return nil, fmt.Errorf("%w: line %d: action %q is not allow or deny", ErrSyntax, n, f[4])
		}
		if rule.Arg != "*" && !strings.HasPrefix(rule.Arg, "+") {
			return nil, fmt.Errorf("%w: line %d: argument %q is not * or +ARG", ErrSyntax, n, rule.Arg)
		}
		if i := strings.IndexByte(rule.Method, '*'); i >= 0 && i != len(rule.Method)-1 {
			return nil, fmt.Errorf("%w: line %d: '*' only at the end of a method", ErrSyntax, n)
		}
		for _, q := range []string{rule.Source, rule.Target} {
			if err := checkQubeSpec(q); err != nil {
				return nil, fmt.Errorf("%w: line %d: %w", ErrSyntax, n, err)
			}
		}
		p.rules = append(p.rules, rule)
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	return p, nil
}

func checkQubeSpec(s string) error {
	switch {
	case s == "@anyvm" || s == "@adminvm":
	case strings.HasPrefix(s, "@tag:") && len(s) > 5:
	case strings.HasPrefix(s, "@type:") && len(s) > 6:
	case strings.HasPrefix(s, "@"):
		return fmt.Errorf("unknown qube keyword %q", s)
	}
	return nil
}

// Decide returns the verdict for a call and the rule that decided it (nil: default).
func (p *Policy) Decide(method, arg string, src, dest Qube) (Action, *Rule) {
	if p != nil {
		for i := range p.rules {
			r := &p.rules[i]
			if matchMethod(r.Method, method) && matchArg(r.Arg, arg) && matchQube(r.Source, src) && matchQube(r.Target, dest) {
				return r.Action, r
			}
		}
	}
	return Action(src.Class == "AdminVM"), nil
}

// Allowed implements rpc.Authorizer.
func (p *Policy) Allowed(method, arg string, src, dest rpc.Ref) bool {
	a, _ := p.Decide(method, arg, Qube{Name: src.Name, Class: src.Class, Tags: src.Tags}, Qube{Name: dest.Name, Class: dest.Class, Tags: dest.Tags})
	return a == Allow
}

func matchMethod(pattern, method string) bool {
	if prefix, ok := strings.CutSuffix(pattern, "*"); ok {
		return strings.HasPrefix(method, prefix)
	}
	return pattern == method
}

func matchArg(pattern, arg string) bool { return pattern == "*" || pattern[1:] == arg }

func matchQube(spec string, q Qube) bool {
	switch {
	case spec == "@anyvm":
		return true
	case spec == "@adminvm":
		return q.Class == "AdminVM"
	case strings.HasPrefix(spec, "@tag:"):
		for _, t := range q.Tags {
			if t == spec[5:] {
				return true
			}
		}
		return false
	case strings.HasPrefix(spec, "@type:"):
		return q.Class == spec[6:]
	}
	return spec == q.Name
}
