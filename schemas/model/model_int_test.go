package model

import (
	"math"
	"testing"

	"github.com/qubesbus/qubesbus/schemas/config"
)

// TestIntPastInt64: a property holding a Python integer past int's range reads as the
// nearest int, so consumers such as the lifecycle see "too much" rather than nothing.
func TestIntPastInt64(t *testing.T) {
	c := loadFixture(t)
	if err := config.Apply(c, []config.Op{
		{Kind: config.OpSetProperty, Domain: "domain-5", Name: "memory", Value: "99999999999999999999"},
		{Kind: config.OpSetProperty, Domain: "domain-5", Name: "qrexec_timeout", Value: "-99999999999999999999"},
	}); err != nil {
		t.Fatal(err)
	}
	m := New(c, DefaultHost, nil)
	h := Holder{D: &c.Domains[len(c.Domains)-1]}
	if n, ok := m.Int(h, "memory"); !ok || n != math.MaxInt {
		t.Errorf("memory = %d, %v; want MaxInt", n, ok)
	}
	if n, ok := m.Int(h, "qrexec_timeout"); !ok || n != math.MinInt {
		t.Errorf("qrexec_timeout = %d, %v; want MinInt", n, ok)
	}
}
