package model

import (
	"testing"

	"github.com/qubesbus/qubesbus/schemas/config"
	"github.com/qubesbus/qubesbus/schemas/qubesxml"
)

// FuzzSet sets any property of any holder of the fixture to any payload: planning
// never panics, and an accepted value is stored so that Get renders it, the stored
// text parses back to the same value, and qubes.xml can hold it.
func FuzzSet(f *testing.F) {
	base := loadFixture(f)
	holders := []string{""}
	for i := range base.Domains {
		holders = append(holders, base.Domains[i].Name())
	}
	for _, seed := range []struct {
		h, p    uint8
		payload string
	}{
		{5, 20, "500"}, {5, 17, "green"}, {5, 44, ""}, {5, 44, "sys-net"}, {0, 3, "default-dvm"},
		{5, 0, "true"}, {5, 11, "10.137.0.99"}, {5, 12, "::1%eth0"}, {1, 0, "de++"},
		{5, 13, "a\nb"}, {5, 4, "b******"}, {2, 14, "hvm"}, {5, 17, "label-3"},
	} {
		f.Add(seed.h, seed.p, []byte(seed.payload))
	}
	f.Fuzz(func(t *testing.T, hi, pi uint8, payload []byte) {
		c := base.Clone()
		m := New(c, DefaultHost, nil)
		vm := holders[int(hi)%len(holders)]
		h := Global
		if vm != "" {
			h = Holder{D: m.Domain(vm)}
		}
		specs := SpecsOf(h.Class())
		s := specs[int(pi)%len(specs)]
		ch, err := m.Set(h, s.Name, payload)
		if err != nil || ch.Err != nil {
			return
		}
		if err := config.Apply(c, ch.Ops); err != nil {
			t.Fatalf("accepted %s=%q but the ops do not apply: %v", s.Name, payload, err)
		}
		m = New(c, DefaultHost, nil)
		if vm != "" {
			h = Holder{D: m.Domain(vm)}
		}
		r, err := m.Get(h, s.Name)
		if err != nil || !r.HasValue || r.Default {
			t.Fatalf("accepted %s=%q but Get says %+v, %v", s.Name, payload, r, err)
		}
		_ = m.GetAllText(h)
		if !r.Value.None {
			back, err := Parse(s, []byte(r.Value.Text))
			if err != nil || back != r.Value {
				t.Fatalf("%s: stored %q does not parse back (%v, %v)", s.Name, r.Value.Text, back, err)
			}
		}
		if _, err := qubesxml.Marshal(c); err != nil {
			t.Fatalf("%s=%q cannot be written to qubes.xml: %v", s.Name, payload, err)
		}
	})
}
