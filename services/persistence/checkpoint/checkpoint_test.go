package checkpoint

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/qubesbus/qubesbus/schemas/config"
	"github.com/qubesbus/qubesbus/schemas/qubesxml"
)

const seed = "../../../testdata/qubes.xml"

func newFile(t *testing.T) (File, *config.Config) {
	t.Helper()
	f := New(filepath.Join(t.TempDir(), "qubes.xml"))
	c, m, err := f.Load(seed)
	if err != nil {
		t.Fatal(err)
	}
	if m != (Mark{}) {
		t.Fatalf("seeded file has mark %+v", m)
	}
	return f, c
}

func withMemory(c *config.Config, v string) *config.Config {
	c = c.Clone()
	if err := config.Apply(c, []config.Op{{Kind: config.OpSetProperty, Domain: "domain-5", Name: "memory", Value: v}}); err != nil {
		panic(err)
	}
	return c
}

func TestSeedWriteLoad(t *testing.T) {
	f, c := newFile(t)
	want, _ := os.ReadFile(seed)
	if got, _ := os.ReadFile(f.Path()); string(got) != string(want) {
		t.Fatal("seed not copied byte for byte")
	}
	res, err := f.Write(withMemory(c, "123"), Mark{Revision: 7, Sequence: 70})
	if err != nil || !res.Written || res.Foreign {
		t.Fatalf("write: %+v %v", res, err)
	}
	got, m, err := f.Load("")
	if err != nil {
		t.Fatal(err)
	}
	if m.Revision != 7 || m.Sequence != 70 {
		t.Fatalf("mark %+v", m)
	}
	d := got.Domains[len(got.Domains)-1]
	if v, _ := d.Property("memory"); v != "123" {
		t.Fatalf("memory = %q", v)
	}
	// The same or an older revision is not written again.
	for _, rev := range []uint64{7, 5} {
		if res, err := f.Write(withMemory(c, "999"), Mark{Revision: rev}); err != nil || res.Written {
			t.Fatalf("rewrite of revision %d: %+v %v", rev, res, err)
		}
	}
	entries, _ := os.ReadDir(filepath.Dir(f.Path()))
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if strings.Join(names, " ") != "qubes.xml qubes.xml.lock qubes.xml.rev" {
		t.Fatalf("files left: %v", names)
	}
}

// TestCrashBetweenMarkerAndFile replays the one window a crash can hit: the marker of
// the new revision is in place, the new qubes.xml is not. Load must say the file holds
// the previous revision, and the next write must not skip the lost one.
func TestCrashBetweenMarkerAndFile(t *testing.T) {
	f, c := newFile(t)
	if _, err := f.Write(withMemory(c, "1"), Mark{Revision: 1, Sequence: 10}); err != nil {
		t.Fatal(err)
	}
	old, _ := os.ReadFile(f.Path())
	if _, err := f.Write(withMemory(c, "2"), Mark{Revision: 2, Sequence: 20}); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(f.Path(), old, 0o660); err != nil { // undo the second rename
		t.Fatal(err)
	}
	_, m, err := f.Load("")
	if err != nil {
		t.Fatal(err)
	}
	if m.Revision != 1 || m.Sequence != 10 {
		t.Fatalf("after a crash between marker and file: mark %+v, want revision 1", m)
	}
	res, err := f.Write(withMemory(c, "2"), Mark{Revision: 2, Sequence: 20})
	if err != nil || !res.Written {
		t.Fatalf("revision 2 again: %+v %v", res, err)
	}
	if _, m, _ := f.Load(""); m.Revision != 2 {
		t.Fatalf("mark %+v", m)
	}
}

func TestForeignEdit(t *testing.T) {
	f, c := newFile(t)
	if _, err := f.Write(withMemory(c, "1"), Mark{Revision: 3, Sequence: 30}); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(f.Path())
	edited := strings.Replace(string(b), `"memory">1<`, `"memory">2<`, 1)
	if err := os.WriteFile(f.Path(), []byte(edited), 0o660); err != nil {
		t.Fatal(err)
	}
	_, _, err := f.Load("")
	if !errors.Is(err, ErrForeignEdit) || !strings.Contains(err.Error(), f.Path()) {
		t.Fatalf("load of a hand-edited file: %v", err)
	}
	// A write overwrites it and says so.
	res, err := f.Write(withMemory(c, "5"), Mark{Revision: 4})
	if err != nil || !res.Written || !res.Foreign {
		t.Fatalf("write over a foreign edit: %+v %v", res, err)
	}
}

func TestLoadErrors(t *testing.T) {
	dir := t.TempDir()
	f := New(filepath.Join(dir, "qubes.xml"))
	if _, _, err := f.Load(""); !errors.Is(err, ErrMissing) {
		t.Fatalf("missing without seed: %v", err)
	}
	if err := os.WriteFile(f.Path(), []byte("<qubes>\n  <labels>\n"), 0o660); err != nil {
		t.Fatal(err)
	}
	_, _, err := f.Load(seed)
	var se *qubesxml.SyntaxError
	if !errors.As(err, &se) || se.File != f.Path() || se.Line == 0 {
		t.Fatalf("truncated file: %v", err)
	}
	if err := os.WriteFile(f.Path()+".rev", []byte("{"), 0o660); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(f.Path(), readSeed(t), 0o660); err != nil {
		t.Fatal(err)
	}
	if _, _, err := f.Load(""); err == nil || !strings.Contains(err.Error(), "qubes.xml.rev") {
		t.Fatalf("corrupt marker: %v", err)
	}
}

func readSeed(t *testing.T) []byte {
	b, err := os.ReadFile(seed)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestConcurrentWriters: writers in parallel (separate lock descriptors, as separate
// processes would have) leave the highest revision, and every load in between sees a
// file matching its marker.
func TestConcurrentWriters(t *testing.T) {
	f, c := newFile(t)
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			for i := range 25 {
				rev := uint64(i*4 + w + 1)
				if _, err := f.Write(withMemory(c, fmt.Sprint(rev)), Mark{Revision: rev}); err != nil {
					t.Error(err)
					return
				}
				if _, _, err := f.Load(""); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	got, m, err := f.Load("")
	if err != nil {
		t.Fatal(err)
	}
	if m.Revision != 100 {
		t.Fatalf("final revision %d, want 100", m.Revision)
	}
	if v, _ := got.Domains[len(got.Domains)-1].Property("memory"); v != "100" {
		t.Fatalf("final memory %q", v)
	}
}

func BenchmarkWrite(b *testing.B) {
	for _, name := range []string{"qubes.xml", "qubes-1000.xml"} {
		b.Run(name, func(b *testing.B) {
			c, err := qubesxml.Load("../../../testdata/" + name)
			if err != nil {
				b.Fatal(err)
			}
			f := New(filepath.Join(b.TempDir(), "qubes.xml"))
			rev := uint64(0)
			for b.Loop() {
				rev++
				if _, err := f.Write(c, Mark{Revision: rev}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// TestFirewallFiles: a qube's firewall rules, which qubes.xml does not hold, are kept in
// firewall/<qube>.xml beside it; written with the revision, read back by Load, and
// removed when the qube has no rules any more or is gone. qubes.xml itself is unchanged
// by them.
func TestFirewallFiles(t *testing.T) {
	f, c := newFile(t)
	const rules = "<firewall version=\"2\">\n  <rules/>\n</firewall>\n"
	withRules := c.Clone()
	if err := config.Apply(withRules, []config.Op{{Kind: config.OpSetFirewall, Domain: "domain-5", Value: rules}}); err != nil {
		t.Fatal(err)
	}
	name := withRules.Domains[len(withRules.Domains)-1].Name()
	if _, err := f.Write(withRules, Mark{Revision: 2, Sequence: 2}); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(filepath.Dir(f.Path()), "firewall", name+".xml")
	if b, err := os.ReadFile(file); err != nil || string(b) != rules {
		t.Fatalf("%s: %q %v", file, b, err)
	}
	plain, _ := qubesxml.Marshal(c)
	if b, _ := os.ReadFile(f.Path()); string(b) != string(plain) {
		t.Fatal("qubes.xml changed by the firewall")
	}
	got, _, err := f.Load("")
	if err != nil {
		t.Fatal(err)
	}
	if fw := got.Domains[len(got.Domains)-1].Firewall; fw != rules {
		t.Fatalf("loaded firewall %q", fw)
	}
	// The rules go: the file goes.
	if _, err := f.Write(c, Mark{Revision: 3, Sequence: 3}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(file); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("firewall file of a qube without rules: %v", err)
	}
	// The qube goes: its file goes.
	if _, err := f.Write(withRules, Mark{Revision: 4, Sequence: 4}); err != nil {
		t.Fatal(err)
	}
	gone := withRules.Clone()
	if err := config.Apply(gone, []config.Op{{Kind: config.OpDelDomain, Domain: "domain-5"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write(gone, Mark{Revision: 5, Sequence: 5}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(file); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("firewall file of a removed qube: %v", err)
	}
}
