// Package qubesxml loads and saves qubes.xml in exactly the format qubesd writes
// (see docs/spec/qubes-xml.md): a file written by qubesd loads and encodes back to the
// same bytes.
//
// Load and Parse return the Config in writer order (labels by index, domains dom0
// first then by name, properties by load stage and name), so Parse∘Marshal is a fixed
// point.
// Devices, volume config and unknown elements are kept as verbatim XML, stored with
// the indentation of depth 0 and re-indented on write.
package qubesxml

import (
	"bytes"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"

	"github.com/qubesbus/qubesbus/schemas/config"
)

// ErrMalformed is wrapped by every error about the content of qubes.xml.
var ErrMalformed = errors.New("malformed qubes.xml")

// SyntaxError locates a problem in qubes.xml. It wraps both ErrMalformed and Err.
type SyntaxError struct {
	File string // empty when decoding a stream
	Line int    // 1-based
	Err  error
}

func (e *SyntaxError) Error() string {
	if e.File == "" {
		return fmt.Sprintf("line %d: %v: %v", e.Line, ErrMalformed, e.Err)
	}
	return fmt.Sprintf("%s:%d: %v: %v", e.File, e.Line, ErrMalformed, e.Err)
}

func (e *SyntaxError) Unwrap() []error { return []error{ErrMalformed, e.Err} }

// vmClasses are the domain classes qubesd knows; any other fails the load.
var vmClasses = map[string]bool{
	"AppVM": true, "TemplateVM": true, "StandaloneVM": true,
	"AdminVM": true, "DispVM": true, "RemoteVM": true,
}

// Depths (in indentation levels) of the elements kept verbatim.
const (
	rootChildDepth   = 1
	domainChildDepth = 3
)

// Load reads and decodes the qubes.xml at path; errors name the file.
func Load(path string) (*config.Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("load qubes.xml: %w", err)
	}
	return decode(data, path)
}

// Parse decodes qubes.xml bytes read from file (named in errors; "" for none).
func Parse(data []byte, file string) (*config.Config, error) {
	return decode(data, file)
}

type parser struct {
	data  []byte
	file  string
	d     *xml.Decoder
	start int64 // input offset where the last token began
}

func decode(data []byte, file string) (*config.Config, error) {
	// bytes.Reader is an io.ByteReader, so the decoder reads it unbuffered and
	// InputOffset indexes data exactly (needed to cut out verbatim elements).
	p := &parser{data: data, file: file, d: xml.NewDecoder(bytes.NewReader(data))}
	var c *config.Config
	for c == nil {
		t, err := p.token()
		if err != nil {
			return nil, err
		}
		switch t := t.(type) {
		case xml.StartElement:
			if qname(t.Name) != "qubes" {
				return nil, p.errAt(p.start, "root element is <%s>, not <qubes>", qname(t.Name))
			}
			if c, err = p.root(t); err != nil {
				return nil, err
			}
		case xml.CharData:
			if !isBlank(t) {
				return nil, p.errAt(p.skipSpace(p.start), "text outside <qubes>")
			}
		}
	}
	for { // only whitespace and comments may follow the root
		t, err := p.next()
		if err == io.EOF {
			return c, nil
		}
		if err != nil {
			return nil, err
		}
		if cd, ok := t.(xml.CharData); !ok || !isBlank(cd) {
			return nil, p.errAt(p.skipSpace(p.start), "content after </qubes>")
		}
	}
}

// next returns the next element or text token, skipping comments, processing
// instructions and directives; io.EOF is returned as is.
func (p *parser) next() (xml.Token, error) {
	for {
		p.start = p.d.InputOffset()
		t, err := p.d.RawToken()
		if err == io.EOF {
			return nil, err
		}
		if err != nil {
			var se *xml.SyntaxError
			if errors.As(err, &se) {
				return nil, &SyntaxError{File: p.file, Line: se.Line, Err: errors.New(se.Msg)}
			}
			return nil, p.errAt(p.start, "%w", err)
		}
		switch t.(type) {
		case xml.Comment, xml.ProcInst, xml.Directive:
			continue
		}
		return t, nil
	}
}

// token is next where the end of input is an error (an element is still open).
func (p *parser) token() (xml.Token, error) {
	t, err := p.next()
	if err == io.EOF {
		return nil, p.errAt(int64(len(p.data)), "unexpected end of file")
	}
	return t, err
}

// skipSpace moves off past whitespace, so that errors about text point at its line.
func (p *parser) skipSpace(off int64) int64 {
	for off < int64(len(p.data)) && isBlank(p.data[off:off+1]) {
		off++
	}
	return off
}

func (p *parser) errAt(off int64, format string, args ...any) error {
	line := 1 + bytes.Count(p.data[:off], []byte{'\n'})
	return &SyntaxError{File: p.file, Line: line, Err: fmt.Errorf(format, args...)}
}

// children calls fn for every child element of el up to el's end tag; fn gets the
// child's start offset and must consume the child. Only whitespace text is allowed.
func (p *parser) children(el xml.StartElement, fn func(xml.StartElement, int64) error) error {
	for {
		t, err := p.token()
		if err != nil {
			return err
		}
		switch t := t.(type) {
		case xml.StartElement:
			if err := fn(t, p.start); err != nil {
				return err
			}
		case xml.EndElement:
			return p.checkEnd(el, t)
		case xml.CharData:
			if !isBlank(t) {
				return p.errAt(p.skipSpace(p.start), "unexpected text in <%s>", qname(el.Name))
			}
		}
	}
}

// text returns the character data of the leaf element el, consuming its end tag.
func (p *parser) text(el xml.StartElement) (string, error) {
	var s string
	for {
		t, err := p.token()
		if err != nil {
			return "", err
		}
		switch t := t.(type) {
		case xml.CharData:
			s += string(t) // usually a single piece
		case xml.StartElement:
			return "", p.errAt(p.start, "unexpected element <%s> in <%s>", qname(t.Name), qname(el.Name))
		case xml.EndElement:
			return s, p.checkEnd(el, t)
		}
	}
}

// raw consumes el (started at off, depth levels deep) and returns its source text
// with the indentation of depth removed.
func (p *parser) raw(el xml.StartElement, off int64, depth int) (config.RawXML, error) {
	open := []xml.StartElement{el}
	for len(open) > 0 {
		t, err := p.token()
		if err != nil {
			return "", err
		}
		switch t := t.(type) {
		case xml.StartElement:
			open = append(open, t)
		case xml.EndElement:
			if err := p.checkEnd(open[len(open)-1], t); err != nil {
				return "", err
			}
			open = open[:len(open)-1]
		}
	}
	src := string(p.data[off:p.d.InputOffset()])
	return config.RawXML(reindent(nil, src, -2*depth)), nil
}

func (p *parser) checkEnd(el xml.StartElement, end xml.EndElement) error {
	if end.Name != el.Name {
		return p.errAt(p.start, "element <%s> closed by </%s>", qname(el.Name), qname(end.Name))
	}
	return nil
}

func (p *parser) unexpected(parent string) func(xml.StartElement, int64) error {
	return func(t xml.StartElement, off int64) error {
		return p.errAt(off, "unexpected element <%s> in <%s>", qname(t.Name), parent)
	}
}

func (p *parser) root(el xml.StartElement) (*config.Config, error) {
	c := &config.Config{}
	err := p.children(el, func(t xml.StartElement, off int64) error {
		switch qname(t.Name) {
		case "labels":
			return p.children(t, func(t xml.StartElement, off int64) error {
				if qname(t.Name) != "label" {
					return p.unexpected("labels")(t, off)
				}
				return p.label(c, t, off)
			})
		case "pools":
			return p.children(t, func(t xml.StartElement, off int64) error {
				if qname(t.Name) != "pool" {
					return p.unexpected("pools")(t, off)
				}
				pool := config.Pool{}
				for _, a := range t.Attr {
					pool.Attrs = append(pool.Attrs, config.Attr{Name: qname(a.Name), Value: a.Value})
				}
				c.Pools = append(c.Pools, pool)
				return p.children(t, p.unexpected("pool"))
			})
		case "properties":
			return p.properties(t, &c.Properties)
		case "domains":
			return p.children(t, func(t xml.StartElement, off int64) error {
				if qname(t.Name) != "domain" {
					return p.unexpected("domains")(t, off)
				}
				d, err := p.domain(t, off)
				c.Domains = append(c.Domains, d)
				return err
			})
		default:
			r, err := p.raw(t, off, rootChildDepth)
			c.Extra = append(c.Extra, r)
			return err
		}
	})
	if err != nil {
		return nil, err
	}
	slices.SortStableFunc(c.Labels, func(a, b config.Label) int { return a.Index - b.Index })
	slices.SortStableFunc(c.Properties, globalCmp)
	slices.SortStableFunc(c.Domains, func(a, b config.Domain) int {
		return domainCmp(a.Class, a.Name(), b.Class, b.Name())
	})
	return c, nil
}

func (p *parser) label(c *config.Config, t xml.StartElement, off int64) error {
	id, _ := attr(t, "id")
	n, ok := strings.CutPrefix(id, "label-")
	idx, err := strconv.Atoi(n)
	if !ok || err != nil {
		return p.errAt(off, "invalid label id %q", id)
	}
	color, _ := attr(t, "color")
	name, err := p.text(t)
	if err != nil {
		return err
	}
	if name == "gray" && color == "0x555753" { // qubesd fixes the old gray on load
		color = "0x555555"
	}
	l := config.Label{Index: idx, Color: color, Name: name}
	for i := range c.Labels { // qubesd keys labels by index: the last one wins
		if c.Labels[i].Index == idx {
			c.Labels[i] = l
			return nil
		}
	}
	c.Labels = append(c.Labels, l)
	return nil
}

// properties reads a <properties> section; a repeated name overrides, as the
// repeated assignment in qubesd does.
func (p *parser) properties(el xml.StartElement, props *[]config.Property) error {
	return p.children(el, func(t xml.StartElement, off int64) error {
		if qname(t.Name) != "property" {
			return p.unexpected("properties")(t, off)
		}
		name, ok := attr(t, "name")
		if !ok {
			return p.errAt(off, "<property> without name")
		}
		value, err := p.text(t)
		if err != nil {
			return err
		}
		if ref, _ := attr(t, "ref"); ref != "" { // legacy form
			value = ref
		}
		for i := range *props {
			if (*props)[i].Name == name {
				(*props)[i].Value = value
				return nil
			}
		}
		*props = append(*props, config.Property{Name: name, Value: value})
		return nil
	})
}

func (p *parser) domain(el xml.StartElement, off int64) (config.Domain, error) {
	class, _ := attr(el, "class")
	if !vmClasses[class] {
		return config.Domain{}, p.errAt(off, "no such VM class: '%s'", class)
	}
	id, _ := attr(el, "id")
	d := config.Domain{ID: id, Class: class}
	err := p.children(el, func(t xml.StartElement, off int64) error {
		switch qname(t.Name) {
		case "properties":
			return p.properties(t, &d.Properties)
		case "features":
			return p.children(t, func(t xml.StartElement, off int64) error {
				if qname(t.Name) != "feature" {
					return p.unexpected("features")(t, off)
				}
				name, ok := attr(t, "name")
				if !ok {
					return p.errAt(off, "<feature> without name")
				}
				value, err := p.text(t)
				if err != nil {
					return err
				}
				for i := range d.Features { // a dict in qubesd: keeps the first position
					if d.Features[i].Name == name {
						d.Features[i].Value = value
						return nil
					}
				}
				d.Features = append(d.Features, config.Feature{Name: name, Value: value})
				return nil
			})
		case "tags":
			return p.children(t, func(t xml.StartElement, off int64) error {
				if qname(t.Name) != "tag" {
					return p.unexpected("tags")(t, off)
				}
				name, ok := attr(t, "name")
				if !ok {
					return p.errAt(off, "<tag> without name")
				}
				if !slices.Contains(d.Tags, name) { // a set in qubesd
					d.Tags = append(d.Tags, name)
				}
				_, err := p.text(t)
				return err
			})
		case "devices":
			r, err := p.raw(t, off, domainChildDepth)
			d.Devices = append(d.Devices, r)
			return err
		case "volume-config":
			if d.VolumeConfig != "" {
				return p.errAt(off, "second <volume-config> in domain")
			}
			var err error
			d.VolumeConfig, err = p.raw(t, off, domainChildDepth)
			return err
		default:
			r, err := p.raw(t, off, domainChildDepth)
			d.Extra = append(d.Extra, r)
			return err
		}
	})
	slices.SortStableFunc(d.Properties, domainPropCmp)
	if d.ID == "" {
		d.ID = defaultID(&d)
	}
	return d, err
}

func attr(t xml.StartElement, name string) (string, bool) {
	for _, a := range t.Attr {
		if a.Name.Space == "" && a.Name.Local == name {
			return a.Value, true
		}
	}
	return "", false
}

// qname is the name as written (RawToken leaves the prefix in Space).
func qname(n xml.Name) string {
	if n.Space == "" {
		return n.Local
	}
	return n.Space + ":" + n.Local
}

func isBlank(b []byte) bool {
	for _, c := range b {
		if c != ' ' && c != '\t' && c != '\n' && c != '\r' {
			return false
		}
	}
	return true
}
