package indexed

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"reflect"
	"strconv"
	"testing"

	"github.com/qubesbus/qubesbus/schemas/config"
	"github.com/qubesbus/qubesbus/schemas/qubesxml"
)

func fixture(t testing.TB, name string) *config.Config {
	t.Helper()
	c, err := qubesxml.Load("../../testdata/" + name)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// sentinels are what callers branch on; both implementations must agree on them.
var sentinels = []error{config.ErrNoSuchDomain, config.ErrDuplicate, config.ErrDanglingRef, config.ErrBadOp}

func kinds(err error) []error {
	var out []error
	for _, s := range sentinels {
		if errors.Is(err, s) {
			out = append(out, s)
		}
	}
	return out
}

// gen makes random batches over a configuration: mostly valid changes, with enough
// renames, deletions, dangling references and duplicates to exercise every check.
type gen struct {
	r    *rand.Rand
	next int // fresh names and qids
}

func (g *gen) pick(xs []string) string { return xs[g.r.IntN(len(xs))] }

func (g *gen) batch(c *config.Config) []config.Op {
	var ids, names []string
	for _, d := range c.Domains {
		ids = append(ids, d.ID)
		names = append(names, d.Name())
	}
	ids = append(ids, "domain-404")
	names = append(names, "", "nosuch")
	labels := []string{"red", "blue", "label-3", "nolabel"}
	for _, l := range c.Labels {
		labels = append(labels, l.Name)
	}
	props := []string{"memory", "name", "qid", "netvm", "template", "label", "default_dispvm", "uuid", "audiovm"}
	globals := []string{"default_netvm", "clockvm", "default_pool", "default_kernel", "label"}
	n := 1 + g.r.IntN(3)
	ops := make([]config.Op, 0, n)
	for range n {
		g.next++
		fresh := "q" + strconv.Itoa(g.next)
		var op config.Op
		switch k := g.r.IntN(15); k {
		case 0, 1, 2:
			p := g.pick(props)
			v := strconv.Itoa(g.r.IntN(5000))
			switch p {
			case "name":
				v = g.pick([]string{fresh, g.pick(names)})
			case "qid":
				v = g.pick([]string{strconv.Itoa(1000 + g.next), strconv.Itoa(g.r.IntN(12))})
			case "netvm", "template", "default_dispvm", "audiovm":
				v = g.pick(names)
			case "label":
				v = g.pick(labels)
			case "uuid":
				v = g.pick([]string{"u-" + fresh, "u-shared"})
			}
			op = config.Op{Kind: config.OpSetProperty, Domain: g.pick(ids), Name: p, Value: v}
		case 3:
			op = config.Op{Kind: config.OpDelProperty, Domain: g.pick(ids), Name: g.pick(props)}
		case 4:
			op = config.Op{Kind: config.OpSetFeature, Domain: g.pick(ids), Name: g.pick([]string{"a", "b", "c"}), Value: fresh}
		case 5:
			op = config.Op{Kind: config.OpDelFeature, Domain: g.pick(ids), Name: g.pick([]string{"a", "b", "c"})}
		case 6:
			op = config.Op{Kind: config.OpAddTag, Domain: g.pick(ids), Name: g.pick([]string{"t1", "t2"})}
		case 7:
			op = config.Op{Kind: config.OpDelTag, Domain: g.pick(ids), Name: g.pick([]string{"t1", "t2"})}
		case 8:
			op = config.Op{Kind: config.OpSetGlobalProperty, Name: g.pick(globals), Value: g.pick(append(names, "red"))}
		case 9:
			op = config.Op{Kind: config.OpDelGlobalProperty, Name: g.pick(globals)}
		case 10, 11:
			id := g.pick([]string{"domain-" + fresh, "domain-" + fresh, g.pick(ids)}) // sometimes a taken id
			d := &config.Domain{ID: id, Class: "AppVM", Properties: []config.Property{
				{Name: "label", Value: g.pick(labels)},
				{Name: "name", Value: g.pick([]string{fresh, fresh, g.pick(names)})},
				{Name: "qid", Value: strconv.Itoa(2000 + g.next)},
				{Name: "netvm", Value: g.pick(names)},
			}, Tags: []string{"x"}}
			if g.r.IntN(8) == 0 {
				d = nil
			}
			op = config.Op{Kind: config.OpAddDomain, New: d}
		case 12:
			op = config.Op{Kind: config.OpDelDomain, Domain: g.pick(ids)}
		case 13:
			l := &config.Label{Index: 9 + g.r.IntN(3), Color: "0x123456", Name: g.pick([]string{"l-" + fresh, "red"})}
			if g.r.IntN(8) == 0 {
				l = nil
			}
			op = config.Op{Kind: config.OpAddLabel, Label: l}
		case 14:
			op = config.Op{Kind: config.OpDelLabel, Name: g.pick(labels)}
		}
		if g.r.IntN(200) == 0 {
			op.Kind = "bogus"
		}
		ops = append(ops, op)
	}
	return ops
}

// TestMatchesConfigApply runs the same random batches through config.Apply and the
// indexed fast path and requires the same outcome, state and lookups after each.
func TestMatchesConfigApply(t *testing.T) {
	for seed := range uint64(3) {
		t.Run(fmt.Sprint("seed", seed), func(t *testing.T) {
			ref := fixture(t, "qubes.xml")
			x := New(fixture(t, "qubes.xml"))
			if !x.valid {
				t.Fatal("fixture does not hold the invariants")
			}
			g := &gen{r: rand.New(rand.NewPCG(seed, 7))}
			var accepted, slow int
			for i := range 1000 {
				ops := g.batch(ref)
				wantErr := config.Apply(ref, ops)
				before := x.valid
				var undo func()
				var gotErr error
				if i%5 == 0 { // exercise undo: apply, undo, apply again
					if u, err := x.Try(ops); err == nil {
						u()
						if !reflect.DeepEqual(x.c.Clone(), x.View().Clone()) {
							t.Fatal("view differs")
						}
					}
				}
				undo, gotErr = x.Try(ops)
				if (wantErr == nil) != (gotErr == nil) || !reflect.DeepEqual(kinds(wantErr), kinds(gotErr)) {
					t.Fatalf("batch %d %+v:\n config.Apply: %v\n indexed:      %v", i, ops, wantErr, gotErr)
				}
				if gotErr == nil {
					accepted++
					_ = undo
				}
				if !before {
					slow++
				}
				if !reflect.DeepEqual(ref.Clone(), x.c.Clone()) {
					t.Fatalf("batch %d %+v: states differ", i, ops)
				}
				checkIndexes(t, x)
			}
			t.Logf("%d of 1000 batches accepted; %d ran from an invalid state", accepted, slow)
			if accepted < 300 {
				t.Fatalf("only %d batches accepted: generator too hostile", accepted)
			}
		})
	}
}

// TestInvalidStartUsesConfigApply starts from a configuration that breaks an invariant
// (a dangling netvm): like config.Apply, every batch is refused until one repairs it.
func TestInvalidStartUsesConfigApply(t *testing.T) {
	c := fixture(t, "qubes.xml")
	work, _ := New(c.Clone()).ByName("work")
	set := func(name, value string) []config.Op {
		return []config.Op{{Kind: config.OpSetProperty, Domain: work.ID, Name: name, Value: value}}
	}
	broken := c.Clone()
	if err := config.Apply(broken, set("netvm", "sys-net")); err != nil {
		t.Fatal(err)
	}
	for i := range broken.Domains {
		if broken.Domains[i].ID == work.ID {
			broken.Domains[i].Properties = setProp(broken.Domains[i].Properties, "netvm", "ghost")
		}
	}
	x := New(broken.Clone())
	if x.valid {
		t.Fatal("a dangling netvm counted as valid")
	}
	if err := x.Apply(set("memory", "1")); !errors.Is(err, config.ErrDanglingRef) {
		t.Fatalf("unrelated change on an invalid config: %v, want ErrDanglingRef as config.Apply", err)
	}
	if err := x.Apply(set("netvm", "sys-net")); err != nil {
		t.Fatal(err)
	}
	if !x.valid {
		t.Fatal("still invalid after the repair")
	}
	if err := x.Apply(set("memory", "1")); err != nil {
		t.Fatal(err)
	}
	checkIndexes(t, x)
}

// checkIndexes compares every index with one rebuilt from scratch.
func checkIndexes(t *testing.T, x *Config) {
	t.Helper()
	y := New(x.c.Clone())
	for _, m := range []struct {
		name      string
		got, want map[string]int
	}{
		{"pos", x.pos, y.pos}, {"names", x.names, y.names}, {"uuids", x.uuids, y.uuids},
		{"qids", x.qids, y.qids}, {"refs", x.refs, y.refs}, {"labels", x.labels, y.labels},
		{"labelRefs", x.labelRefs, y.labelRefs},
	} {
		if !reflect.DeepEqual(m.got, m.want) {
			t.Fatalf("index %s = %v, want %v", m.name, m.got, m.want)
		}
	}
	for i := range x.c.Domains {
		d := &x.c.Domains[i]
		got, ok := x.ByName(d.Name())
		if !ok || got.Name() != d.Name() {
			t.Fatalf("ByName(%q) = %v, %v", d.Name(), got, ok)
		}
		if u, ok := d.Property("uuid"); ok && u != "" {
			if got, ok := x.ByUUID(u); !ok || func() string { v, _ := got.Property("uuid"); return v }() != u {
				t.Fatalf("ByUUID(%q) failed", u)
			}
		}
	}
	if x.valid != y.valid {
		t.Fatalf("valid = %v, rebuilt %v", x.valid, y.valid)
	}
}

// TestViewIsStable holds a view across later batches: copy-on-write keeps it intact.
func TestViewIsStable(t *testing.T) {
	x := New(fixture(t, "qubes.xml"))
	v := x.View()
	want := v.Clone()
	g := &gen{r: rand.New(rand.NewPCG(1, 2))}
	for range 2000 {
		_ = x.Apply(g.batch(x.c))
	}
	if !reflect.DeepEqual(want, v.Clone()) {
		t.Fatal("a view changed under later batches")
	}
}

// TestQubeRefPropsMatchConfig probes config.CheckInvariants with a dangling value for
// each candidate property: exactly those in qubeRefProps must be refused.
func TestQubeRefPropsMatchConfig(t *testing.T) {
	candidates := []string{"memory", "maxmem", "vcpus", "kernel", "kernelopts", "label", "name",
		"qid", "uuid", "provides_network", "virt_mode", "default_user", "dispvm_allowed",
		"template_for_dispvms", "include_in_backups", "debug", "autostart", "qrexec_timeout",
		"shutdown_timeout", "ip", "mac", "keyboard_layout", "default_kernel", "default_pool",
		"stubdom_mem", "updateable", "installed_by_rpm", "icon"}
	for p := range qubeRefProps {
		candidates = append(candidates, p)
	}
	for _, p := range candidates {
		c := &config.Config{
			Labels:  []config.Label{{Index: 1, Name: "red"}},
			Domains: []config.Domain{{ID: "domain-1", Class: "AppVM", Properties: []config.Property{{Name: "name", Value: "a"}, {Name: p, Value: "no-such-qube"}}}},
		}
		refused := errors.Is(c.CheckInvariants(), config.ErrDanglingRef)
		if p == "label" || p == "name" {
			continue
		}
		if refused != qubeRefProps[p] {
			t.Errorf("property %q: config refuses a dangling value: %v, indexed: %v", p, refused, qubeRefProps[p])
		}
	}
}

// BenchmarkApply1000 compares one property change on 1009 qubes: the indexed fast path
// against config.Apply (clone everything, check everything).
func BenchmarkApply1000(b *testing.B) {
	base := fixture(b, "qubes-1000.xml")
	id := base.Domains[len(base.Domains)/2].ID
	ops := func(i int) []config.Op {
		return []config.Op{{Kind: config.OpSetProperty, Domain: id, Name: "memory", Value: strconv.Itoa(400 + i%100)}}
	}
	b.Run("indexed", func(b *testing.B) {
		x := New(base.Clone())
		b.ReportAllocs()
		for i := 0; b.Loop(); i++ {
			if err := x.Apply(ops(i)); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("config.Apply", func(b *testing.B) {
		c := base.Clone()
		b.ReportAllocs()
		for i := 0; b.Loop(); i++ {
			if err := config.Apply(c, ops(i)); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("indexed-rename", func(b *testing.B) {
		x := New(base.Clone())
		b.ReportAllocs()
		for i := 0; b.Loop(); i++ {
			if err := x.Apply([]config.Op{{Kind: config.OpSetProperty, Domain: id, Name: "name", Value: "renamed-" + strconv.Itoa(i)}}); err != nil {
				b.Fatal(err)
			}
		}
	})
}
