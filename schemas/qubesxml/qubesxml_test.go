package qubesxml

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/qubesbus/qubesbus/schemas/config"
)

// Both fixtures were written by the real qubesd.
var fixtures = []string{"../../testdata/qubes.xml", "../../testdata/qubes-1000.xml"}

func readFixture(t testing.TB, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func mustEncode(t testing.TB, c *config.Config) []byte {
	t.Helper()
	b, err := Marshal(c)
	if err != nil {
		t.Fatalf("encode: %v", err)
	}
	return b
}

func mustDecode(t testing.TB, b []byte) *config.Config {
	t.Helper()
	c, err := Parse(b, "")
	if err != nil {
		t.Fatalf("decode: %v", err)
	}
	return c
}

// firstDiff describes where two outputs start to differ, by line.
func firstDiff(got, want []byte) string {
	g, w := strings.Split(string(got), "\n"), strings.Split(string(want), "\n")
	for i := 0; i < len(g) && i < len(w); i++ {
		if g[i] != w[i] {
			return fmt.Sprintf("line %d:\n got %q\nwant %q", i+1, g[i], w[i])
		}
	}
	return fmt.Sprintf("lengths differ: got %d lines, want %d", len(g), len(w))
}

func TestRoundTripIsByteIdentical(t *testing.T) {
	for _, path := range fixtures {
		t.Run(filepath.Base(path), func(t *testing.T) {
			want := readFixture(t, path)
			c, err := Load(path)
			if err != nil {
				t.Fatal(err)
			}
			if got := mustEncode(t, c); !bytes.Equal(got, want) {
				t.Fatalf("encoded output differs from the qubesd file at %s", firstDiff(got, want))
			}
		})
	}
}

func TestFixtureContent(t *testing.T) {
	c, err := Load(fixtures[0])
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for i := range c.Domains {
		names = append(names, c.Domains[i].Name())
	}
	wantNames := []string{"dom0", "default-dvm", "fedora-41", "legacy", "personal",
		"sys-firewall", "sys-net", "untrusted", "work"}
	if !reflect.DeepEqual(names, wantNames) {
		t.Errorf("domains = %v, want %v", names, wantNames)
	}
	if len(c.Labels) != 8 || c.Labels[4] != (config.Label{Index: 5, Color: "0x555555", Name: "gray"}) {
		t.Errorf("labels = %v", c.Labels)
	}
	if got := c.Pools[1].Attrs; len(got) != 3 || got[2] != (config.Attr{Name: "driver", Value: "linux-kernel"}) {
		t.Errorf("pool attrs = %v", got)
	}
	work := c.Domains[8]
	if v, _ := work.Property("netvm"); v != "sys-firewall" || work.ID != "domain-5" || work.Class != "AppVM" {
		t.Errorf("work = %+v", work)
	}
	if want := []string{"work-tag", "backup", "audiovm-dom0", "guivm-dom0"}; !reflect.DeepEqual(work.Tags, want) {
		t.Errorf("work tags = %v, want stored order %v", work.Tags, want)
	}
	if f := c.Domains[7].Features; len(f) != 1 || f[0] != (config.Feature{Name: "service.crond"}) {
		t.Errorf("untrusted features = %v", f)
	}
	if v, ok := c.Domains[6].Property("netvm"); !ok || v != "" {
		t.Errorf("sys-net netvm = %q, %v; want set to empty", v, ok)
	}
	tmpl := c.Domains[2]
	if len(tmpl.Devices) != 1 || tmpl.Devices[0] != `<devices class="pci"/>` {
		t.Errorf("devices = %q", tmpl.Devices)
	}
	// Verbatim elements are stored at depth 0.
	if vc := string(tmpl.VolumeConfig); !strings.HasPrefix(vc, "<volume-config>\n  <volume name=\"root\"") ||
		!strings.HasSuffix(vc, "/>\n</volume-config>") {
		t.Errorf("volume config = %q", vc)
	}
}

// fixedPointInputs are accepted documents that are not in writer form.
var fixedPointInputs = map[string]string{
	"legacy ref and gray": `<qubes><labels><label id="label-5" color="0x555753">gray</label></labels>
<domains><domain class="AppVM"><properties><property name="template" ref="fedora"/>
<property name="qid">3</property></properties></domain></domains></qubes>`,
	"unsorted": `<?xml version="1.0"?><!-- c --><qubes>
<domains>
 <domain id="domain-2" class="AppVM"><properties><property name="name">b</property><property name="label">red</property></properties>
 <tags><tag name="z"/><tag name="a"/><tag name="z"/></tags><features><feature name="y">1</feature><feature name="x"/><feature name="y">2</feature></features>
 <volume-config>
        <volume name="root"/>
 </volume-config><foo>x
y</foo></domain>
 <domain id="domain-0" class="AdminVM"/>
 <domain id="domain-1" class="AppVM"><properties><property name="name">a</property></properties></domain>
</domains>
<labels><label id="label-2" color="2">b</label><label id="label-1" color="1">a</label></labels>
<extra a='1'><x>t</x></extra>
</qubes>`,
	"empty": `<qubes/>`,
}

func TestDecodeEncodeFixedPoint(t *testing.T) {
	inputs := map[string][]byte{}
	for _, p := range fixtures {
		inputs[filepath.Base(p)] = readFixture(t, p)
	}
	for name, s := range fixedPointInputs {
		inputs[name] = []byte(s)
	}
	for name, in := range inputs {
		t.Run(name, func(t *testing.T) {
			c1 := mustDecode(t, in)
			out1 := mustEncode(t, c1)
			c2 := mustDecode(t, out1)
			if !reflect.DeepEqual(c1, c2) {
				t.Fatalf("decode(encode(c)) != c\nc1 %+v\nc2 %+v", c1, c2)
			}
			if out2 := mustEncode(t, c2); !bytes.Equal(out1, out2) {
				t.Fatalf("second encoding differs at %s", firstDiff(out2, out1))
			}
		})
	}
}

func TestLegacyForms(t *testing.T) {
	c := mustDecode(t, []byte(fixedPointInputs["legacy ref and gray"]))
	if c.Labels[0].Color != "0x555555" {
		t.Errorf("gray colour not rewritten: %q", c.Labels[0].Color)
	}
	d := c.Domains[0]
	if v, _ := d.Property("template"); v != "fedora" {
		t.Errorf("template from ref = %q", v)
	}
	if d.ID != "domain-3" {
		t.Errorf("id from qid = %q", d.ID)
	}
	// Only the gray label is fixed.
	c = mustDecode(t, []byte(`<qubes><labels><label id="label-9" color="0x555753">x</label></labels></qubes>`))
	if c.Labels[0].Color != "0x555753" {
		t.Errorf("non-gray label rewritten: %q", c.Labels[0].Color)
	}
}

func TestEncodeOrderAndFormat(t *testing.T) {
	c := &config.Config{
		Labels:     []config.Label{{Index: 9, Color: "0x00ffff", Name: "cyan"}, {Index: 1, Color: "0xcc0000", Name: "red"}},
		Properties: []config.Property{{Name: "updatevm", Value: "b"}, {Name: "default_dispvm", Value: "a"}},
		Domains: []config.Domain{
			{Class: "AppVM", Properties: []config.Property{{Name: "template", Value: "t"},
				{Name: "qid", Value: "7"}, {Name: "netvm"}, {Name: "name", Value: "b"}, {Name: "label", Value: "red"}},
				Features:     []config.Feature{{Name: "z", Value: "1"}, {Name: "a"}},
				Tags:         []string{"z", "a"},
				Devices:      []config.RawXML{`<devices class="pci"/>`},
				VolumeConfig: "<volume-config>\n  <volume name=\"root\"/>\n</volume-config>"},
			{Class: "AppVM", ID: "domain-3", Properties: []config.Property{{Name: "name", Value: "a"}}},
			{Class: "AdminVM", Properties: []config.Property{{Name: "label", Value: "black"}}},
		},
		Extra: []config.RawXML{"<x>\n  <y/>\n</x>"},
	}
	want := `<qubes>
  <labels>
    <label id="label-1" color="0xcc0000">red</label>
    <label id="label-9" color="0x00ffff">cyan</label>
  </labels>
  <pools/>
  <properties>
    <property name="default_dispvm">a</property>
    <property name="updatevm">b</property>
  </properties>
  <domains>
    <domain id="domain-0" class="AdminVM">
      <properties>
        <property name="label">black</property>
      </properties>
      <features/>
      <tags/>
    </domain>
    <domain id="domain-3" class="AppVM">
      <properties>
        <property name="name">a</property>
      </properties>
      <features/>
      <tags/>
    </domain>
    <domain id="domain-7" class="AppVM">
      <properties>
        <property name="label">red</property>
        <property name="name">b</property>
        <property name="qid">7</property>
        <property name="netvm"></property>
        <property name="template">t</property>
      </properties>
      <features>
        <feature name="z">1</feature>
        <feature name="a"></feature>
      </features>
      <tags>
        <tag name="z"/>
        <tag name="a"/>
      </tags>
      <devices class="pci"/>
      <volume-config>
        <volume name="root"/>
      </volume-config>
    </domain>
  </domains>
  <x>
    <y/>
  </x>
</qubes>
`
	if got := mustEncode(t, c); string(got) != want {
		t.Fatalf("got\n%s\nwant\n%s\n%s", got, want, firstDiff(got, []byte(want)))
	}
	if c.Domains[0].Properties[0].Name != "template" {
		t.Error("Encode reordered the caller's properties")
	}
}

func TestEscaping(t *testing.T) {
	tests := []struct {
		name string
		c    config.Config
		want string // must appear in the output
	}{
		{"attr newline", config.Config{Labels: []config.Label{{Index: 9, Color: "0x00ffff\n", Name: "c"}}},
			`<label id="label-9" color="0x00ffff&#10;">c</label>`},
		{"attr tab quote", config.Config{Pools: []config.Pool{{Attrs: []config.Attr{{Name: "dir_path", Value: "a\tb\"c'd<&>"}}}}},
			`<pool dir_path="a&#9;b&quot;c'd&lt;&amp;&gt;"/>`},
		{"attr cr", config.Config{Properties: []config.Property{{Name: "a\rb", Value: "x"}}},
			`<property name="a&#13;b">x</property>`},
		{"text specials", config.Config{Properties: []config.Property{{Name: "p", Value: `a&b<c>d"e'`}}},
			`<property name="p">a&amp;b&lt;c&gt;d"e'</property>`},
		{"text newline raw, cr escaped", config.Config{Properties: []config.Property{{Name: "p", Value: "a\nb\tc\rd"}}},
			"<property name=\"p\">a\nb\tc&#13;d</property>"},
		{"empty property", config.Config{Properties: []config.Property{{Name: "default_netvm"}}},
			`<property name="default_netvm"></property>`},
		{"empty feature", config.Config{Domains: []config.Domain{{ID: "domain-0", Class: "AdminVM", Features: []config.Feature{{Name: "f"}}}}},
			`<feature name="f"></feature>`},
		{"utf-8", config.Config{Properties: []config.Property{{Name: "p", Value: "žluť"}}},
			`<property name="p">žluť</property>`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out := mustEncode(t, &tt.c)
			if !bytes.Contains(out, []byte(tt.want)) {
				t.Fatalf("output lacks %q:\n%s", tt.want, out)
			}
			if got := mustDecode(t, out); !reflect.DeepEqual(got, &tt.c) {
				t.Fatalf("decoded %+v, want %+v", got, tt.c)
			}
		})
	}
}

func TestEncodeRejectsNonXMLCharacters(t *testing.T) {
	for _, v := range []string{"a\x00b", "\x1b[0m", "bad\xffutf8", "\uFFFE"} {
		c := &config.Config{Properties: []config.Property{{Name: "p", Value: v}}}
		if _, err := Marshal(c); err == nil {
			t.Errorf("Marshal(%q): no error", v)
		}
		path := filepath.Join(t.TempDir(), "qubes.xml")
		if err := Save(path, c); err == nil {
			t.Errorf("Save(%q): no error", v)
		}
		if _, err := os.Stat(path); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("Save(%q) wrote the file (%v)", v, err)
		}
	}
}

func TestCorruptInput(t *testing.T) {
	fixture := string(readFixture(t, fixtures[0]))
	lineOf := func(s string) int { // line of the first occurrence of s in the fixture
		i := strings.Index(fixture, s)
		if i < 0 {
			t.Fatalf("fixture lacks %q", s)
		}
		return 1 + strings.Count(fixture[:i], "\n")
	}
	cut := func(s string, extra int) string { return fixture[:strings.Index(fixture, s)+extra] }
	tests := []struct {
		name, data, msg string
		line            int
	}{
		{"truncated mid tag", cut(`<property name="qid">5`, 10), "unexpected EOF", lineOf(`<property name="qid">5`)},
		{"truncated mid text", cut(`<property name="qid">5`, 21), "unexpected end of file", lineOf(`<property name="qid">5`)},
		{"truncated after line", cut(`    <domain id="domain-5"`, 0), "unexpected end of file", lineOf(`    <domain id="domain-5"`)},
		{"empty file", "", "unexpected end of file", 1},
		{"mismatched end tag", strings.Replace(fixture, `personal</property>`, `personal</propety>`, 1),
			"element <property> closed by </propety>", lineOf(`personal</property>`)},
		{"bad attribute", strings.Replace(fixture, `class="StandaloneVM"`, `class=StandaloneVM`, 1),
			"unquoted or missing attribute value", lineOf(`class="StandaloneVM"`)},
		{"unknown class", strings.Replace(fixture, `class="StandaloneVM"`, `class="FooVM"`, 1),
			"no such VM class: 'FooVM'", lineOf(`class="StandaloneVM"`)},
		{"unknown element in labels", strings.Replace(fixture, `<label id="label-3"`, `<lable id="label-3"`, 1),
			"unexpected element <lable> in <labels>", lineOf(`<label id="label-3"`)},
		{"bad label id", strings.Replace(fixture, `label-4"`, `label-x"`, 1), `invalid label id "label-x"`, lineOf(`label-4"`)},
		{"text in domain", strings.Replace(fixture, "<features/>\n      <tags>\n        <tag name=\"backup\"/>",
			"<features/>\n      junk<tags>\n        <tag name=\"backup\"/>", 1), "unexpected text in <domain>",
			lineOf("<features/>\n      <tags>\n        <tag name=\"backup\"/>") + 1},
		{"second root", fixture + "\n<qubes/>\n", "content after </qubes>", strings.Count(fixture, "\n") + 2},
		{"wrong root", "\n<qubesx/>", "root element is <qubesx>", 2},
		{"bad entity", strings.Replace(fixture, ">legacy<", ">leg&acy<", 1), "invalid character entity", lineOf(">legacy<")},
	}
	dir := t.TempDir()
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(dir, strings.ReplaceAll(tt.name, " ", "-")+".xml")
			if err := os.WriteFile(path, []byte(tt.data), 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := Load(path)
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("Load error %v does not wrap ErrMalformed", err)
			}
			var se *SyntaxError
			if !errors.As(err, &se) || se.Line != tt.line || se.File != path {
				t.Fatalf("error %v: want file %s line %d", err, path, tt.line)
			}
			if prefix := fmt.Sprintf("%s:%d: ", path, tt.line); !strings.HasPrefix(err.Error(), prefix) ||
				!strings.Contains(err.Error(), tt.msg) {
				t.Fatalf("error %q: want prefix %q and %q", err, prefix, tt.msg)
			}
			// Without a file, the error names the line only.
			_, err = Parse([]byte(tt.data), "")
			if want := fmt.Sprintf("line %d: ", tt.line); err == nil || !strings.HasPrefix(err.Error(), want) {
				t.Fatalf("Parse error %v: want prefix %q", err, want)
			}
		})
	}
}

func TestLoadMissingFile(t *testing.T) {
	_, err := Load(filepath.Join(t.TempDir(), "qubes.xml"))
	if !errors.Is(err, os.ErrNotExist) || errors.Is(err, ErrMalformed) {
		t.Fatalf("got %v, want a not-exist error", err)
	}
}

func TestSaveIsAtomic(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "qubes.xml")
	if err := os.WriteFile(path, []byte("old"), 0o644); err != nil {
		t.Fatal(err)
	}
	old, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	c, err := Load(fixtures[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := Save(path, c); err != nil {
		t.Fatal(err)
	}
	if got, want := readFixture(t, path), readFixture(t, fixtures[0]); !bytes.Equal(got, want) {
		t.Fatalf("saved file differs at %s", firstDiff(got, want))
	}
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o660 {
		t.Errorf("mode = %v, want 0660", st.Mode().Perm())
	}
	if os.SameFile(old, st) {
		t.Error("file rewritten in place, not replaced by rename")
	}
	assertOnlyFile(t, dir, "qubes.xml")

	// A value that cannot be written leaves the old file and no temporary file.
	bad := &config.Config{Properties: []config.Property{{Name: "p", Value: "\x00"}}}
	if err := Save(path, bad); err == nil {
		t.Fatal("Save of a NUL value succeeded")
	}
	if got := readFixture(t, path); !bytes.Equal(got, readFixture(t, fixtures[0])) {
		t.Error("failed Save changed the file")
	}
	assertOnlyFile(t, dir, "qubes.xml")

	// Saving into a missing directory fails cleanly.
	if err := Save(filepath.Join(dir, "nodir", "qubes.xml"), c); err == nil {
		t.Error("Save into a missing directory succeeded")
	}
}

func assertOnlyFile(t *testing.T, dir, name string) {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(ents) != 1 || ents[0].Name() != name {
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Fatalf("directory holds %v, want only %s", names, name)
	}
}

func FuzzDecode(f *testing.F) {
	f.Add(readFixture(f, fixtures[0]))
	for _, s := range fixedPointInputs {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Parse(data, "")
		if err != nil {
			var se *SyntaxError
			if !errors.As(err, &se) || !errors.Is(err, ErrMalformed) {
				t.Fatalf("decode error %v is not a *SyntaxError", err)
			}
			return
		}
		b, err := Marshal(c)
		if err != nil {
			t.Fatalf("encode of decoded config: %v", err)
		}
		c2, err := Parse(b, "")
		if err != nil {
			t.Fatalf("decode of encoded config: %v\n%s", err, b)
		}
		if !reflect.DeepEqual(c, c2) {
			t.Fatalf("decode(encode(c)) != c\nc1 %#v\nc2 %#v", c, c2)
		}
	})
}

func BenchmarkLoad1000(b *testing.B) {
	b.SetBytes(int64(len(readFixture(b, fixtures[1]))))
	for b.Loop() {
		if _, err := Load(fixtures[1]); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkEncode1000(b *testing.B) {
	c, err := Load(fixtures[1])
	if err != nil {
		b.Fatal(err)
	}
	var out []byte
	for b.Loop() {
		if out, err = Marshal(c); err != nil {
			b.Fatal(err)
		}
	}
	b.SetBytes(int64(len(out)))
}
