package model

import (
	"testing"

	"github.com/qubesbus/qubesbus/schemas/config"
	"github.com/qubesbus/qubesbus/schemas/qubesxml"
)

// BenchmarkGetAllScale is qvm-ls on the 1000-qube fixture: one GetAll per qube, each
// over a fresh model (as the service builds one per call).
func BenchmarkGetAllScale(b *testing.B) {
	c, err := qubesxml.Load("../../testdata/qubes-1000.xml")
	if err != nil {
		b.Fatal(err)
	}
	names := make([]string, len(c.Domains))
	for i := range c.Domains {
		names[i] = c.Domains[i].Name()
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		m := New(c, DefaultHost, nil)
		h, _ := m.Holder(names[i%len(names)])
		_ = m.GetAllText(h)
	}
}

// BenchmarkGetAllIndexed is one GetAll as the service serves it: over the replica's
// name index, so its cost does not grow with the number of qubes.
func BenchmarkGetAllIndexed(b *testing.B) {
	c, err := qubesxml.Load("../../testdata/qubes-1000.xml")
	if err != nil {
		b.Fatal(err)
	}
	byName := make(map[string]*config.Domain, len(c.Domains))
	names := make([]string, len(c.Domains))
	for i := range c.Domains {
		names[i] = c.Domains[i].Name()
		byName[names[i]] = &c.Domains[i]
	}
	lookup := func(n string) *config.Domain { return byName[n] }
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		m := NewIndexed(c, DefaultHost, nil, lookup)
		h, _ := m.Holder(names[i%len(names)])
		_ = m.GetAllText(h)
	}
}
