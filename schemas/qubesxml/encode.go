package qubesxml

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/qubesbus/qubesbus/schemas/config"
)

// stage4 holds the qube properties qubesd loads in stage 4 (references to other
// qubes); they are written after the stage-2 ones. No name is stage 2 in one class
// and stage 4 in another, so one set serves all classes. Global properties are all
// stage 3 and are written by name only.
var stage4 = map[string]bool{
	"appvm_default_bootmode": true, "audiovm": true, "bootmode": true,
	"default_dispvm": true, "guivm": true, "kernelopts": true,
	"management_dispvm": true, "netvm": true, "relayvm": true, "template": true,
}

func domainPropCmp(a, b config.Property) int {
	if sa, sb := stage4[a.Name], stage4[b.Name]; sa != sb {
		if sa {
			return 1
		}
		return -1
	}
	return strings.Compare(a.Name, b.Name)
}

func globalCmp(a, b config.Property) int { return strings.Compare(a.Name, b.Name) }

// domainCmp orders dom0 (AdminVM) first, then by name in byte order, as qubesd does.
func domainCmp(classA, nameA, classB, nameB string) int {
	if a, b := classA == "AdminVM", classB == "AdminVM"; a != b {
		if a {
			return -1
		}
		return 1
	}
	return strings.Compare(nameA, nameB)
}

// defaultID is the id qubesd writes, for domains that have none set.
func defaultID(d *config.Domain) string {
	if q, ok := d.Property("qid"); ok {
		return "domain-" + q
	}
	if d.Class == "AdminVM" {
		return "domain-0"
	}
	return ""
}

// Marshal returns c as qubesd would write it, or an error if c holds a string that
// cannot be represented in XML (Save then writes nothing).
func Marshal(c *config.Config) ([]byte, error) {
	e := &encoder{b: make([]byte, 0, 1024+1300*len(c.Domains))}
	e.s("<qubes>\n")

	labels := slices.Clone(c.Labels)
	slices.SortStableFunc(labels, func(a, b config.Label) int { return a.Index - b.Index })
	e.open(1, "labels", len(labels) == 0)
	for _, l := range labels {
		e.indent(2)
		e.s(`<label id="label-`)
		e.b = strconv.AppendInt(e.b, int64(l.Index), 10)
		e.s(`" color="`)
		e.escape(l.Color, true)
		e.s(`">`)
		e.escape(l.Name, false)
		e.s("</label>\n")
	}
	e.close(1, "labels", len(labels) == 0)

	e.open(1, "pools", len(c.Pools) == 0)
	for _, p := range c.Pools {
		e.indent(2)
		e.s("<pool")
		for _, a := range p.Attrs {
			e.s(" " + a.Name + `="`)
			e.escape(a.Value, true)
			e.s(`"`)
		}
		e.s("/>\n")
	}
	e.close(1, "pools", len(c.Pools) == 0)

	e.properties(1, c.Properties, globalCmp)

	type entry struct {
		d    *config.Domain
		name string
	}
	doms := make([]entry, len(c.Domains))
	for i := range c.Domains {
		doms[i] = entry{&c.Domains[i], c.Domains[i].Name()}
	}
	slices.SortStableFunc(doms, func(a, b entry) int {
		return domainCmp(a.d.Class, a.name, b.d.Class, b.name)
	})
	e.open(1, "domains", len(doms) == 0)
	for _, x := range doms {
		e.domain(x.d)
	}
	e.close(1, "domains", len(doms) == 0)

	for _, r := range c.Extra {
		e.raw(rootChildDepth, r)
	}
	e.s("</qubes>\n")
	return e.b, e.err
}

func (e *encoder) domain(d *config.Domain) {
	id := d.ID
	if id == "" {
		id = defaultID(d)
	}
	e.indent(2)
	e.s(`<domain id="`)
	e.escape(id, true)
	e.s(`" class="`)
	e.escape(d.Class, true)
	e.s("\">\n")

	e.properties(3, d.Properties, domainPropCmp)

	e.open(3, "features", len(d.Features) == 0)
	for _, f := range d.Features {
		e.indent(4)
		e.s(`<feature name="`)
		e.escape(f.Name, true)
		e.s(`">`)
		e.escape(f.Value, false)
		e.s("</feature>\n")
	}
	e.close(3, "features", len(d.Features) == 0)

	e.open(3, "tags", len(d.Tags) == 0)
	for _, t := range d.Tags {
		e.indent(4)
		e.s(`<tag name="`)
		e.escape(t, true)
		e.s("\"/>\n")
	}
	e.close(3, "tags", len(d.Tags) == 0)

	for _, r := range d.Devices {
		e.raw(domainChildDepth, r)
	}
	if d.VolumeConfig != "" {
		e.raw(domainChildDepth, d.VolumeConfig)
	}
	for _, r := range d.Extra {
		e.raw(domainChildDepth, r)
	}
	e.indent(2)
	e.s("</domain>\n")
}

type encoder struct {
	b   []byte
	err error
}

func (e *encoder) s(s string) { e.b = append(e.b, s...) }

func (e *encoder) indent(depth int) { e.b = appendSpaces(e.b, 2*depth) }

// open and close write a container element, self-closed when empty.
func (e *encoder) open(depth int, tag string, empty bool) {
	e.indent(depth)
	if empty {
		e.s("<" + tag + "/>\n")
	} else {
		e.s("<" + tag + ">\n")
	}
}

func (e *encoder) close(depth int, tag string, empty bool) {
	if !empty {
		e.indent(depth)
		e.s("</" + tag + ">\n")
	}
}

func (e *encoder) properties(depth int, props []config.Property, cmp func(a, b config.Property) int) {
	if !slices.IsSortedFunc(props, cmp) {
		props = slices.Clone(props)
		slices.SortStableFunc(props, cmp)
	}
	e.open(depth, "properties", len(props) == 0)
	for _, p := range props {
		e.indent(depth + 1)
		e.s(`<property name="`)
		e.escape(p.Name, true)
		// An empty value is written with an end tag, as lxml does for text "".
		e.s(`">`)
		e.escape(p.Value, false)
		e.s("</property>\n")
	}
	e.close(depth, "properties", len(props) == 0)
}

func (e *encoder) raw(depth int, r config.RawXML) {
	e.indent(depth)
	e.b = reindent(e.b, string(r), 2*depth)
	e.s("\n")
}

// escape writes s escaped as libxml2 does: text escapes & < > and CR; attribute
// values also " and TAB/LF (which a parser would otherwise normalise away).
func (e *encoder) escape(s string, attr bool) {
	last := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c >= utf8.RuneSelf {
			r, size := utf8.DecodeRuneInString(s[i:])
			if r == utf8.RuneError && size == 1 || r == 0xFFFE || r == 0xFFFF {
				e.fail(s)
			}
			i += size
			continue
		}
		var esc string
		switch {
		case c == '&':
			esc = "&amp;"
		case c == '<':
			esc = "&lt;"
		case c == '>':
			esc = "&gt;"
		case c == '\r':
			esc = "&#13;"
		case c == '"' && attr:
			esc = "&quot;"
		case c == '\n' && attr:
			esc = "&#10;"
		case c == '\t' && attr:
			esc = "&#9;"
		case c < 0x20 && c != '\n' && c != '\t':
			e.fail(s)
		}
		if esc != "" {
			e.b = append(e.b, s[last:i]...)
			e.s(esc)
			last = i + 1
		}
		i++
	}
	e.b = append(e.b, s[last:]...)
}

func (e *encoder) fail(s string) {
	if e.err == nil {
		e.err = fmt.Errorf("encode qubes.xml: value %q has characters not allowed in XML", s)
	}
}

// reindent appends raw to b, shifting by delta spaces the indentation after every
// line break that separates two tags ('>', newline, spaces, '<'); negative delta
// removes at most the spaces present. Other line breaks belong to text and are kept.
func reindent(b []byte, raw string, delta int) []byte {
	for {
		i := strings.IndexByte(raw, '\n')
		if i < 0 {
			return append(b, raw...)
		}
		j := i + 1
		for j < len(raw) && raw[j] == ' ' {
			j++
		}
		b = append(b, raw[:i+1]...)
		if i == 0 || raw[i-1] != '>' || j == len(raw) || raw[j] != '<' {
			raw = raw[i+1:]
			continue
		}
		b = appendSpaces(b, max(j-i-1+delta, 0))
		raw = raw[j:]
	}
}

const spaces = "                                "

func appendSpaces(b []byte, n int) []byte {
	for n > len(spaces) {
		b = append(b, spaces...)
		n -= len(spaces)
	}
	return append(b, spaces[:n]...)
}
