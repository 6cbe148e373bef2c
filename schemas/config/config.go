// Package config holds the host configuration model that qubes.xml stores and that
// services exchange over NATS: labels, pools, global properties and domains.
//
// The model is deliberately close to the document: properties are name/value text as
// written in qubes.xml (only explicitly set ones), features keep their insertion order,
// and parts this code does not interpret (devices, volume config, unknown elements) are
// kept verbatim so they are written back unchanged.
package config

// Config is everything qubes.xml holds for one host.
type Config struct {
	Labels     []Label    `json:"labels"`
	Pools      []Pool     `json:"pools"`
	Properties []Property `json:"properties,omitempty"` // global, explicitly set ones
	Domains    []Domain   `json:"domains"`
	// Extra holds root-level elements this code does not understand, verbatim XML.
	Extra []RawXML `json:"extra,omitempty"`
}

// Label is a qube colour label.
type Label struct {
	Index int    `json:"index"`
	Color string `json:"color"` // as stored, e.g. "0xcc0000"
	Name  string `json:"name"`
}

// Pool is a storage pool definition; attributes keep their document order.
type Pool struct {
	Attrs []Attr `json:"attrs"`
}

// Attr returns the value of an attribute and whether the pool has it.
func (p Pool) Attr(name string) (string, bool) {
	for _, a := range p.Attrs {
		if a.Name == name {
			return a.Value, true
		}
	}
	return "", false
}

// Name is the pool's name attribute.
func (p Pool) Name() string {
	v, _ := p.Attr("name")
	return v
}

// Attr is one XML attribute.
type Attr struct {
	Name  string `json:"name"`
	Value string `json:"value"`
}

// Property is an explicitly set property value, as text.
type Property struct {
	Name  string `json:"name"`
	Value string `json:"value"`
}

// Feature is one qube feature; an empty Value is a feature set to "".
type Feature struct {
	Name  string `json:"name"`
	Value string `json:"value"`
}

// Domain is one qube.
type Domain struct {
	ID         string     `json:"id"`    // the id attribute, "domain-<qid>"
	Class      string     `json:"class"` // AppVM, TemplateVM, StandaloneVM, AdminVM, DispVM, RemoteVM
	Properties []Property `json:"properties,omitempty"`
	Features   []Feature  `json:"features,omitempty"`
	Tags       []string   `json:"tags,omitempty"`
	// Devices and VolumeConfig are kept as verbatim XML elements (each complete
	// <devices …>…</devices> or <volume-config>…</volume-config>), re-indented on write.
	Devices      []RawXML `json:"devices,omitempty"`
	VolumeConfig RawXML   `json:"volume_config,omitempty"`
	// Extra holds domain child elements this code does not understand, verbatim.
	Extra []RawXML `json:"extra,omitempty"`
	// Firewall is the qube's firewall.xml (schemas/firewall), kept in the change log
	// but not in qubes.xml; empty: the qube has no firewall.xml (qubesd's defaults).
	Firewall string `json:"firewall,omitempty"`
}

// RawXML is a complete XML element kept as text.
type RawXML string

// Property returns the explicitly set value of a property and whether it is set.
func (d *Domain) Property(name string) (string, bool) {
	for _, p := range d.Properties {
		if p.Name == name {
			return p.Value, true
		}
	}
	return "", false
}

// Name is the qube's name ("dom0" for the AdminVM, which stores none).
func (d *Domain) Name() string {
	if v, ok := d.Property("name"); ok {
		return v
	}
	if d.Class == "AdminVM" {
		return "dom0"
	}
	return ""
}

// Clone returns a deep copy.
func (c *Config) Clone() *Config {
	out := &Config{
		Labels:     append([]Label(nil), c.Labels...),
		Properties: append([]Property(nil), c.Properties...),
		Extra:      append([]RawXML(nil), c.Extra...),
		Pools:      make([]Pool, len(c.Pools)),
		Domains:    make([]Domain, len(c.Domains)),
	}
	for i, p := range c.Pools {
		out.Pools[i] = Pool{Attrs: append([]Attr(nil), p.Attrs...)}
	}
	for i, d := range c.Domains {
		out.Domains[i] = d.Clone()
	}
	return out
}

// Clone returns a deep copy.
func (d Domain) Clone() Domain {
	d.Properties = append([]Property(nil), d.Properties...)
	d.Features = append([]Feature(nil), d.Features...)
	d.Tags = append([]string(nil), d.Tags...)
	d.Devices = append([]RawXML(nil), d.Devices...)
	d.Extra = append([]RawXML(nil), d.Extra...)
	return d
}
