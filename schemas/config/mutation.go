package config

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// Op is one change to a configuration. Exactly one group of fields is used, chosen by
// Kind. Domains are addressed by their id attribute ("domain-<qid>"), which never
// changes, so a batch may rename nothing and still be unambiguous.
type Op struct {
	Kind   OpKind  `json:"kind"`
	Domain string  `json:"domain,omitempty"` // Domain.ID; empty for global ops
	Name   string  `json:"name,omitempty"`   // property, feature, tag or label name
	Value  string  `json:"value,omitempty"`
	New    *Domain `json:"new,omitempty"`   // OpAddDomain
	Label  *Label  `json:"label,omitempty"` // OpAddLabel
	Pool   *Pool   `json:"pool,omitempty"`  // OpAddPool, OpSetPool
}

// OpKind names a change.
type OpKind string

const (
	OpSetProperty       OpKind = "set-property"        // Domain, Name, Value
	OpDelProperty       OpKind = "del-property"        // Domain, Name
	OpSetGlobalProperty OpKind = "set-global-property" // Name, Value
	OpDelGlobalProperty OpKind = "del-global-property" // Name
	OpSetFeature        OpKind = "set-feature"         // Domain, Name, Value
	OpDelFeature        OpKind = "del-feature"         // Domain, Name
	OpAddTag            OpKind = "add-tag"             // Domain, Name
	OpDelTag            OpKind = "del-tag"             // Domain, Name
	OpAddDomain         OpKind = "add-domain"          // New
	OpDelDomain         OpKind = "del-domain"          // Domain
	OpAddLabel          OpKind = "add-label"           // Label
	OpDelLabel          OpKind = "del-label"           // Name
	// Storage: pools by their name attribute; a qube's whole <volume-config> element
	// (Value, "" for none).
	OpAddPool         OpKind = "add-pool"          // Pool (appended)
	OpSetPool         OpKind = "set-pool"          // Pool (replaces the pool of the same name in place)
	OpDelPool         OpKind = "del-pool"          // Name
	OpSetVolumeConfig OpKind = "set-volume-config" // Domain, Value
	// Devices and firewall: a qube's <devices class="Name"> element (Value, verbatim;
	// "" removes it), and its firewall.xml (Value, "" for none).
	OpSetDevices  OpKind = "set-devices"  // Domain, Name (device class), Value
	OpSetFirewall OpKind = "set-firewall" // Domain, Value
)

// Mutation is a batch of ops applied atomically, optionally only at an expected revision.
type Mutation struct {
	ExpectRevision uint64 `json:"expect_revision,omitempty"` // 0: any
	Ops            []Op   `json:"ops"`
	// ChangesConfig asks persistence to write qubes.xml once the batch is durable.
	ChangesConfig bool `json:"changes_config,omitempty"`
	// DeferSync: persistence answers once the change log holds the change, before it
	// is durable; the caller makes it durable (configstore.Client.Sync) before it
	// acknowledges the change to anyone. So one caller can have several changes in
	// flight and share one sync among them.
	DeferSync bool `json:"defer_sync,omitempty"`
}

// Errors of Apply; callers branch on them.
var (
	ErrNoSuchDomain  = errors.New("no such domain")
	ErrDuplicate     = errors.New("duplicate name or qid")
	ErrDanglingRef   = errors.New("reference to a missing qube or label")
	ErrBadOp         = errors.New("bad op")
	ErrStaleRevision = errors.New("stale revision")
)

// Apply applies ops to c in order. On error c is unchanged (the ops run on a copy of
// what they touch only after every op validated), so a batch is all or nothing.
func Apply(c *Config, ops []Op) error {
	work := c.Clone()
	for i, op := range ops {
		if err := applyOne(work, op); err != nil {
			return fmt.Errorf("op %d (%s): %w", i, op.Kind, err)
		}
	}
	if err := work.CheckInvariants(); err != nil {
		return err
	}
	*c = *work
	return nil
}

func (c *Config) domainIndex(id string) int {
	for i := range c.Domains {
		if c.Domains[i].ID == id {
			return i
		}
	}
	return -1
}

func applyOne(c *Config, op Op) error {
	var d *Domain
	switch op.Kind {
	case OpSetProperty, OpDelProperty, OpSetFeature, OpDelFeature, OpAddTag, OpDelTag, OpDelDomain, OpSetVolumeConfig,
		OpSetDevices, OpSetFirewall:
		i := c.domainIndex(op.Domain)
		if i < 0 {
			return fmt.Errorf("%w: %s", ErrNoSuchDomain, op.Domain)
		}
		d = &c.Domains[i]
	}
	switch op.Kind {
	case OpSetProperty:
		d.Properties = setProp(d.Properties, op.Name, op.Value)
	case OpDelProperty:
		d.Properties = delProp(d.Properties, op.Name)
	case OpSetGlobalProperty:
		c.Properties = setProp(c.Properties, op.Name, op.Value)
	case OpDelGlobalProperty:
		c.Properties = delProp(c.Properties, op.Name)
	case OpSetFeature:
		for i := range d.Features {
			if d.Features[i].Name == op.Name {
				d.Features[i].Value = op.Value
				return nil
			}
		}
		d.Features = append(d.Features, Feature{Name: op.Name, Value: op.Value})
	case OpDelFeature:
		for i := range d.Features {
			if d.Features[i].Name == op.Name {
				d.Features = append(d.Features[:i:i], d.Features[i+1:]...)
				return nil
			}
		}
	case OpAddTag:
		for _, t := range d.Tags {
			if t == op.Name {
				return nil
			}
		}
		d.Tags = append(d.Tags, op.Name)
	case OpDelTag:
		for i, t := range d.Tags {
			if t == op.Name {
				d.Tags = append(d.Tags[:i:i], d.Tags[i+1:]...)
				return nil
			}
		}
	case OpAddDomain:
		if op.New == nil {
			return fmt.Errorf("%w: add-domain without a domain", ErrBadOp)
		}
		c.Domains = append(c.Domains, op.New.Clone())
	case OpDelDomain:
		i := c.domainIndex(op.Domain)
		c.Domains = append(c.Domains[:i:i], c.Domains[i+1:]...)
	case OpAddLabel:
		if op.Label == nil {
			return fmt.Errorf("%w: add-label without a label", ErrBadOp)
		}
		c.Labels = append(c.Labels, *op.Label)
	case OpDelLabel:
		for i, l := range c.Labels {
			if l.Name == op.Name {
				c.Labels = append(c.Labels[:i:i], c.Labels[i+1:]...)
				return nil
			}
		}
		return fmt.Errorf("%w: no label %s", ErrBadOp, op.Name)
	case OpSetVolumeConfig:
		d.VolumeConfig = RawXML(op.Value)
	case OpSetDevices:
		d.Devices = SetDevicesElement(d.Devices, op.Name, RawXML(op.Value))
	case OpSetFirewall:
		d.Firewall = op.Value
	case OpAddPool:
		if op.Pool == nil || op.Pool.Name() == "" {
			return fmt.Errorf("%w: add-pool without a named pool", ErrBadOp)
		}
		if c.PoolIndex(op.Pool.Name()) >= 0 {
			return fmt.Errorf("%w: pool %q", ErrDuplicate, op.Pool.Name())
		}
		c.Pools = append(c.Pools, Pool{Attrs: append([]Attr(nil), op.Pool.Attrs...)})
	case OpSetPool:
		if op.Pool == nil {
			return fmt.Errorf("%w: set-pool without a pool", ErrBadOp)
		}
		i := c.PoolIndex(op.Pool.Name())
		if i < 0 {
			return fmt.Errorf("%w: no pool %q", ErrBadOp, op.Pool.Name())
		}
		c.Pools[i] = Pool{Attrs: append([]Attr(nil), op.Pool.Attrs...)}
	case OpDelPool:
		i := c.PoolIndex(op.Name)
		if i < 0 {
			return fmt.Errorf("%w: no pool %q", ErrBadOp, op.Name)
		}
		c.Pools = append(c.Pools[:i:i], c.Pools[i+1:]...)
	default:
		return fmt.Errorf("%w: unknown kind %q", ErrBadOp, op.Kind)
	}
	return nil
}

// PoolIndex is the position of the pool named name, or -1.
func (c *Config) PoolIndex(name string) int {
	for i := range c.Pools {
		if c.Pools[i].Name() == name {
			return i
		}
	}
	return -1
}

func setProp(ps []Property, name, value string) []Property {
	for i := range ps {
		if ps[i].Name == name {
			ps[i].Value = value
			return ps
		}
	}
	return append(ps, Property{Name: name, Value: value})
}

func delProp(ps []Property, name string) []Property {
	for i := range ps {
		if ps[i].Name == name {
			return append(ps[:i:i], ps[i+1:]...)
		}
	}
	return ps
}

// qubeRefProps are the properties whose value names another qube ("" = none).
var qubeRefProps = map[string]bool{
	"netvm": true, "template": true, "default_dispvm": true, "management_dispvm": true,
	"audiovm": true, "guivm": true, "default_netvm": true, "default_template": true,
	"clockvm": true, "updatevm": true, "default_guivm": true, "default_audiovm": true,
}

// CheckInvariants reports what no accepted configuration may hold: two qubes with one
// name, qid or id; a property naming a missing qube; a qube with a missing label.
func (c *Config) CheckInvariants() error {
	var errs []error
	names := map[string]bool{}
	qids := map[string]bool{}
	ids := map[string]bool{}
	for i := range c.Domains {
		d := &c.Domains[i]
		n := d.Name()
		if names[n] {
			errs = append(errs, fmt.Errorf("%w: name %q", ErrDuplicate, n))
		}
		names[n] = true
		if ids[d.ID] {
			errs = append(errs, fmt.Errorf("%w: id %q", ErrDuplicate, d.ID))
		}
		ids[d.ID] = true
		if q, ok := d.Property("qid"); ok {
			if qids[q] {
				errs = append(errs, fmt.Errorf("%w: qid %s", ErrDuplicate, q))
			}
			qids[q] = true
		}
	}
	labels := map[string]bool{}
	for _, l := range c.Labels {
		labels[l.Name] = true
		labels["label-"+strconv.Itoa(l.Index)] = true
	}
	check := func(owner string, p Property) {
		switch {
		case qubeRefProps[p.Name] && p.Value != "" && !names[p.Value]:
			errs = append(errs, fmt.Errorf("%w: %s.%s = %q", ErrDanglingRef, owner, p.Name, p.Value))
		case p.Name == "label" && !labels[p.Value]:
			errs = append(errs, fmt.Errorf("%w: %s.label = %q", ErrDanglingRef, owner, p.Value))
		}
	}
	for i := range c.Domains {
		for _, p := range c.Domains[i].Properties {
			check(c.Domains[i].Name(), p)
		}
	}
	for _, p := range c.Properties {
		if !strings.HasPrefix(p.Name, "default_pool") {
			check("global", p)
		}
	}
	return errors.Join(errs...)
}

// SetDevicesElement returns devs with the <devices class="class"> element replaced by
// el (appended if there was none; removed if el is empty). The other classes keep
// their places.
func SetDevicesElement(devs []RawXML, class string, el RawXML) []RawXML {
	out := make([]RawXML, 0, len(devs)+1)
	done := false
	for _, d := range devs {
		if DevicesClass(d) == class {
			if el != "" && !done {
				out = append(out, el)
			}
			done = true
			continue
		}
		out = append(out, d)
	}
	if !done && el != "" {
		out = append(out, el)
	}
	return out
}

// DevicesClass is the class attribute of a verbatim <devices class="…"> element.
func DevicesClass(el RawXML) string {
	s := string(el)
	const key = `class="`
	i := strings.Index(s, key)
	end := strings.IndexByte(s, '>')
	if i < 0 || (end >= 0 && i > end) {
		return ""
	}
	s = s[i+len(key):]
	j := strings.IndexByte(s, '"')
	if j < 0 {
		return ""
	}
	return s[:j]
}
