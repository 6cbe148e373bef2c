package model

import (
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/qubesbus/qubesbus/schemas/config"
)

// Feature returns a qube's own feature.
func Feature(d *config.Domain, name string) (string, bool) {
	for _, f := range d.Features {
		if f.Name == name {
			return f.Value, true
		}
	}
	return "", false
}

// HasTag reports whether a qube has a tag.
func HasTag(d *config.Domain, tag string) bool {
	for _, t := range d.Tags {
		if t == tag {
			return true
		}
	}
	return false
}

// Template returns the qube's template, or nil (no template property or none set).
func (m *Model) Template(d *config.Domain) *config.Domain {
	if d == nil {
		return nil
	}
	return m.Ref(Holder{D: d}, "template")
}

// NetVM returns the qube's effective netvm, or nil.
func (m *Model) NetVM(d *config.Domain) *config.Domain {
	if d == nil {
		return nil
	}
	return m.Ref(Holder{D: d}, "netvm")
}

// CheckFeature looks a feature up on the qube, then along its template chain (template
// true), then along its netvm chain (netvm true), then on dom0 (adminVM true), as the
// feature.CheckWith* methods do.
func (m *Model) CheckFeature(d *config.Domain, name string, template, netvm, adminVM bool) (string, bool) {
	if v, ok := Feature(d, name); ok {
		return v, true
	}
	// Chains are short: a slice on the stack, not a map per call (GetAll checks
	// features for several defaults).
	var buf [8]*config.Domain
	seen := append(buf[:0], d)
	if template {
		for t := m.Template(d); t != nil && !slices.Contains(seen, t); t = m.Template(t) {
			seen = append(seen, t)
			if v, ok := Feature(t, name); ok {
				return v, true
			}
		}
	}
	if netvm {
		for n := m.NetVM(d); n != nil && !slices.Contains(seen, n); n = m.NetVM(n) {
			seen = append(seen, n)
			if v, ok := Feature(n, name); ok {
				return v, true
			}
		}
	}
	if adminVM {
		if dom0 := m.AdminVM(); dom0 != nil {
			if v, ok := Feature(dom0, name); ok {
				return v, true
			}
		}
	}
	return "", false
}

// AdminVM returns dom0.
func (m *Model) AdminVM() *config.Domain {
	for i := range m.C.Domains {
		if m.C.Domains[i].Class == "AdminVM" {
			return &m.C.Domains[i]
		}
	}
	return nil
}

// HasPCIDevices reports whether the qube has persistent PCI device assignments.
func HasPCIDevices(d *config.Domain) bool {
	for _, raw := range d.Devices {
		s := string(raw)
		if strings.Contains(s, `class="pci"`) && strings.Contains(s, "<device ") {
			return true
		}
	}
	return false
}

// IsNetworked reports whether the qube reaches a network: it provides one or has a
// netvm.
func (m *Model) IsNetworked(d *config.Domain) bool {
	if !HasProperty(d.Class, "provides_network") {
		return false
	}
	return m.Bool(Holder{D: d}, "provides_network") || m.NetVM(d) != nil
}

// ProvidesNetwork reports the effective provides_network of a qube.
func (m *Model) ProvidesNetwork(d *config.Domain) bool {
	return HasProperty(d.Class, "provides_network") && m.Bool(Holder{D: d}, "provides_network")
}

func (m *Model) qid(d *config.Domain) int {
	if d.Class == "AdminVM" {
		return 0
	}
	v, _ := d.Property("qid")
	n, _ := strconv.Atoi(v)
	return n
}

// QID returns the qube's qid.
func (m *Model) QID(d *config.Domain) int { return m.qid(d) }

// ipFor derives a qube's address from its qid (disposables: 10.138 and the dispid).
func (m *Model) ipFor(d *config.Domain) Value {
	prefix, n := "10.137.", m.qid(d)
	if d.Class == "DispVM" {
		prefix = "10.138."
		v, _ := d.Property("dispid")
		n, _ = strconv.Atoi(v)
	}
	if n < 255 {
		return Text(fmt.Sprintf("%s%d.%d", prefix, n>>8, n&255))
	}
	n--
	return Text(fmt.Sprintf("%s%d.%d", prefix, n/254, n%254+1))
}

func (m *Model) ip6For(d *config.Domain) Value {
	if d.Class == "DispVM" {
		v, _ := d.Property("dispid")
		n, _ := strconv.Atoi(v)
		return Text(fmt.Sprintf("fd09:24ef:4179::a8a:%x", n))
	}
	return Text(fmt.Sprintf("fd09:24ef:4179::a89:%x", m.qid(d)))
}

// ipv6Enabled is the feature "ipv6" along the netvm chain.
func (m *Model) ipv6Enabled(d *config.Domain) bool {
	v, ok := m.CheckFeature(d, "ipv6", false, true, false)
	return ok && v != ""
}

// ConnectedTo returns the qubes whose effective netvm is d, in collection order.
func (m *Model) ConnectedTo(d *config.Domain) []*config.Domain {
	var out []*config.Domain
	for _, c := range m.Domains() {
		if c != d && m.NetVM(c) == d {
			out = append(out, c)
		}
	}
	return out
}

// netChainHas reports whether walking the netvm chain from start reaches target.
func (m *Model) netChainHas(start, target *config.Domain) bool {
	seen := map[*config.Domain]bool{}
	for n := start; n != nil && !seen[n]; n = m.NetVM(n) {
		if n == target {
			return true
		}
		seen[n] = true
	}
	return false
}

// templateForDispVMs reports whether a qube may be used as a disposable template.
func (m *Model) templateForDispVMs(d *config.Domain) bool {
	return d != nil && HasProperty(d.Class, "template_for_dispvms") && m.Bool(Holder{D: d}, "template_for_dispvms")
}

// DefaultPool is the pool the global default_pool resolves to when unset: the pool
// named "default", else the file pool at /var/lib/qubes.
func (m *Model) defaultPool() (Value, bool) {
	for _, p := range m.C.Pools {
		if poolAttr(p, "name") == "default" {
			return Text("default"), true
		}
	}
	for _, p := range m.C.Pools {
		if poolAttr(p, "dir_path") == "/var/lib/qubes" && strings.HasPrefix(poolAttr(p, "driver"), "file") {
			return Text(poolAttr(p, "name")), true
		}
	}
	return Value{}, false
}

func poolAttr(p config.Pool, name string) string {
	for _, a := range p.Attrs {
		if a.Name == name {
			return a.Value
		}
	}
	return ""
}

// PoolExists reports whether a storage pool of that name exists.
func (m *Model) PoolExists(name string) bool {
	for _, p := range m.C.Pools {
		if poolAttr(p, "name") == name {
			return true
		}
	}
	return false
}

// Label returns the label of that name.
func (m *Model) Label(name string) *config.Label {
	for i := range m.C.Labels {
		if m.C.Labels[i].Name == name {
			return &m.C.Labels[i]
		}
	}
	return nil
}

// LookupLabel finds a label as qubesd's get_label does: by name, then by a decimal
// index.
func (m *Model) LookupLabel(text string) *config.Label {
	if l := m.Label(text); l != nil {
		return l
	}
	if n, ok := ParseInt(text); ok {
		for i := range m.C.Labels {
			if int64(m.C.Labels[i].Index) == n {
				return &m.C.Labels[i]
			}
		}
	}
	return nil
}
