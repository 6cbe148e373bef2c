// Package probefile reads the differential probes recorded from the real qubesd
// (schemas/model/testdata/probe, written by the scripts there): each call with the
// outcome and events qubesd gave, and the deviations, where qubesbus answers
// otherwise on purpose. The model's tests and the whole system's replay the same
// files through it.
//
// Recording format, one block per call:
//
//	>>	method	dest	arg	payload
//	=	OK [content] | EXC Class: message | ABORT
//	.	qube (or _ for the global holder)	event	key=value …
//
// Bytes outside printable ASCII and backslashes are written \xNN; lines starting
// with # are comments, lines starting with "@<TAB>" scope the blocks of a deviations
// file.
package probefile

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// Call is one recorded call.
type Call struct {
	File                       string
	Line                       int
	Method, Dest, Arg, Payload string
	Outcome                    string
	Events                     []string
}

// Key identifies the request of a call.
func (c Call) Key() string { return c.Method + "\t" + c.Dest + "\t" + c.Arg + "\t" + c.Payload }

// Where is the call's FILE:LINE.
func (c Call) Where() string { return fmt.Sprintf("%s:%d", c.File, c.Line) }

// Read returns the calls of the probe file name in dir, in order.
func Read(dir, name string) ([]Call, error) {
	path := filepath.Join(dir, name)
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var calls []Call
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, "@\t") {
			continue
		}
		fields := strings.SplitN(line, "\t", 5)
		switch {
		case fields[0] == ">>" && len(fields) == 5:
			calls = append(calls, Call{File: name, Line: n, Method: fields[1], Dest: fields[2], Arg: fields[3], Payload: fields[4]})
		case fields[0] == "=" && len(calls) > 0:
			calls[len(calls)-1].Outcome = strings.Join(fields[1:], "\t")
		case fields[0] == "." && len(calls) > 0:
			calls[len(calls)-1].Events = append(calls[len(calls)-1].Events, strings.Join(fields[1:], "\t"))
		default:
			return nil, fmt.Errorf("%s:%d: malformed line", path, n)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return calls, nil
}

// Esc writes bytes as the recorder does: printable ASCII but backslash kept, the
// rest \xNN.
func Esc(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if c := s[i]; c >= 32 && c < 127 && c != '\\' {
			b.WriteByte(c)
		} else {
			fmt.Fprintf(&b, `\x%02x`, c)
		}
	}
	return b.String()
}

// Unesc reads what Esc wrote.
func Unesc(s string) ([]byte, error) {
	var out []byte
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) && s[i+1] == 'x' {
			n, err := strconv.ParseUint(s[i+2:i+4], 16, 8)
			if err != nil {
				return nil, fmt.Errorf("bad escape in %q", s)
			}
			out = append(out, byte(n))
			i += 3
			continue
		}
		out = append(out, s[i])
	}
	return out, nil
}

// DeviationsFile is the name of the deviations file beside the probes.
const DeviationsFile = "deviations.txt"

// Deviations are the blocks of DeviationsFile, each under the scope of the "@" line
// before it: "@<TAB>*" (every call with the block's method, dest, arg and payload),
// "@<TAB>FILE" (the calls of FILE with them) or "@<TAB>FILE:LINE" (the one call
// recorded at that line, which must be the block's).
type Deviations struct {
	ByKey  map[string]Call // scope + "\t" + key
	Pinned map[string]Call // FILE:LINE
	used   map[string]bool // the keys of both maps that matched a call
}

// ReadDeviations reads DeviationsFile in dir.
func ReadDeviations(dir string) (*Deviations, error) {
	data, err := os.ReadFile(filepath.Join(dir, DeviationsFile))
	if err != nil {
		return nil, err
	}
	scopes := map[int]string{}
	scope := ""
	for n, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, "@\t"); ok {
			scope = rest
		} else if strings.HasPrefix(line, ">>\t") {
			if scope == "" {
				return nil, fmt.Errorf("%s:%d: block before any @ scope", DeviationsFile, n+1)
			}
			scopes[n+1] = scope
		}
	}
	calls, err := Read(dir, DeviationsFile)
	if err != nil {
		return nil, err
	}
	d := &Deviations{ByKey: map[string]Call{}, Pinned: map[string]Call{}, used: map[string]bool{}}
	for _, c := range calls {
		scope := scopes[c.Line]
		if !strings.Contains(scope, ":") {
			d.ByKey[scope+"\t"+c.Key()] = c
			continue
		}
		if _, dup := d.Pinned[scope]; dup {
			return nil, fmt.Errorf("%s:%d: a second block pinned to %s", DeviationsFile, c.Line, scope)
		}
		d.Pinned[scope] = c
	}
	return d, nil
}

// lookup returns the deviation that replaces call c, if any, and marks it used. A
// block pinned to c's line that records another request is an error.
func (d *Deviations) lookup(c Call) (Call, bool, error) {
	if p, ok := d.Pinned[c.Where()]; ok {
		if p.Key() != c.Key() {
			return Call{}, false, fmt.Errorf("%s:%d is pinned to %s, which records %q, not %q", DeviationsFile, p.Line, c.Where(), c.Key(), p.Key())
		}
		d.used[c.Where()] = true
		return p, true, nil
	}
	for _, scope := range []string{c.File, "*"} {
		if p, ok := d.ByKey[scope+"\t"+c.Key()]; ok {
			d.used[scope+"\t"+c.Key()] = true
			return p, true, nil
		}
	}
	return Call{}, false, nil
}

// Expect is what a replay must answer to call c: its deviation's outcome and events
// if it has one (deviated), else what qubesd answered. A deviation that records what
// qubesd answered anyway, or a pinned one of another request, is an error.
func (d *Deviations) Expect(c Call) (outcome string, events []string, deviated bool, err error) {
	p, ok, err := d.lookup(c)
	if err != nil || !ok {
		return c.Outcome, c.Events, false, err
	}
	if p.Outcome == c.Outcome && slices.Equal(p.Events, c.Events) {
		return "", nil, false, fmt.Errorf("%s: the deviation for %s is what qubesd answered", p.Where(), c.Where())
	}
	return p.Outcome, p.Events, true, nil
}

// Used reports whether the deviation under key (of Pinned or ByKey) matched a call.
func (d *Deviations) Used(key string) bool { return d.used[key] }

// Unused lists the deviations no call matched, as FILE:LINE of their blocks.
func (d *Deviations) Unused() []string {
	var out []string
	for k, p := range d.Pinned {
		if !d.used[k] {
			out = append(out, p.Where())
		}
	}
	for k, p := range d.ByKey {
		if !d.used[k] {
			out = append(out, p.Where())
		}
	}
	slices.Sort(out)
	return out
}
