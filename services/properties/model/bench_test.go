package model

import (
	"testing"

	"github.com/qubesbus/qubesbus/services/persistence/qubesxml"
)

// BenchmarkGetAllScale is qvm-ls on the 1000-qube fixture: one GetAll per qube, each
// over a fresh model (as the service builds one per call).
func BenchmarkGetAllScale(b *testing.B) {
	c, err := qubesxml.Load("../../../testdata/qubes-1000.xml")
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
