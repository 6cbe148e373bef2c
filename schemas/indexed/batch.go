package indexed

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/qubesbus/qubesbus/schemas/config"
)

// batch is one Try on the fast path. Ops change the configuration in place (after
// copy-on-write) and record how to undo; the indexes move from the old to the new state
// of what was touched only once every op has run, then the invariants are checked.
type batch struct {
	x    *Config
	undo []func() // run in reverse

	orig  map[string]origDomain // by id: the domain before the batch
	order []string              // touched ids, first touch first

	globals     bool // global properties touched; origGlobals holds the old ones
	origGlobals []config.Property
	labels      bool // labels touched; origLabels holds the old ones
	origLabels  []config.Label
}

type origDomain struct {
	d       config.Domain
	existed bool
}

func (x *Config) tryFast(ops []config.Op) (func(), error) {
	b := &batch{x: x, orig: map[string]origDomain{}}
	for i, op := range ops {
		if err := b.apply(op); err != nil {
			b.revertData()
			if errors.Is(err, errSlowPath) {
				return nil, err
			}
			return nil, fmt.Errorf("op %d (%s): %w", i, op.Kind, err)
		}
	}
	b.recount(1)
	if err := b.check(); err != nil {
		b.recount(-1)
		b.revertData()
		x.fixLookups()
		return nil, err
	}
	x.fixLookups()
	return func() {
		b.recount(-1)
		b.revertData()
		x.fixLookups()
	}, nil
}

// recount moves the indexes from the old to the new state of what the batch touched
// (dir 1), or back (dir -1). The state left is subtracted before the other is added,
// so a key shared by an old and a new state never looks duplicated.
func (b *batch) recount(dir int) {
	x := b.x
	old := func(delta int) {
		for _, id := range b.order {
			if o := b.orig[id]; o.existed {
				x.count(&o.d, delta)
			}
		}
		if b.globals {
			x.countGlobals(b.origGlobals, delta)
		}
		if b.labels {
			x.countLabels(b.origLabels, delta)
		}
	}
	cur := func(delta int) {
		for _, id := range b.order {
			if d, ok := x.Domain(id); ok {
				x.count(d, delta)
			}
		}
		if b.globals {
			x.countGlobals(x.c.Properties, delta)
		}
		if b.labels {
			x.countLabels(x.c.Labels, delta)
		}
	}
	if dir > 0 {
		old(-1)
		cur(1)
	} else {
		cur(-1)
		old(1)
	}
}

func (b *batch) revertData() {
	for i := len(b.undo) - 1; i >= 0; i-- {
		b.undo[i]()
	}
	b.undo = nil
}

// check reports what config.CheckInvariants would, looking only at what the batch
// touched: their names, qids and references, and references to names or labels that
// the batch removed.
func (b *batch) check() error {
	x := b.x
	var errs []error
	for _, id := range b.order {
		if d, ok := x.Domain(id); ok {
			n := d.Name()
			if x.names[n] > 1 {
				errs = append(errs, fmt.Errorf("%w: name %q", config.ErrDuplicate, n))
			}
			if q, ok := d.Property("qid"); ok && x.qids[q] > 1 {
				errs = append(errs, fmt.Errorf("%w: qid %s", config.ErrDuplicate, q))
			}
			for _, p := range d.Properties {
				errs = x.checkRef(errs, n, p)
			}
		}
		if o := b.orig[id]; o.existed {
			if n := o.d.Name(); n != "" && x.names[n] == 0 && x.refs[n] > 0 {
				errs = append(errs, fmt.Errorf("%w: qube %q is gone but still referenced", config.ErrDanglingRef, n))
			}
		}
	}
	if b.globals {
		for _, p := range x.c.Properties {
			if !strings.HasPrefix(p.Name, "default_pool") {
				errs = x.checkRef(errs, "global", p)
			}
		}
	}
	if b.labels {
		for _, l := range b.origLabels {
			for _, k := range labelKeys(l) {
				if x.labels[k] == 0 && x.labelRefs[k] > 0 {
					errs = append(errs, fmt.Errorf("%w: label %q is gone but still used", config.ErrDanglingRef, k))
				}
			}
		}
	}
	return errors.Join(errs...)
}

// touch returns the domain with id for changing, copying it first if the batch has not
// yet; ok is false if there is none.
func (b *batch) touch(id string) (*config.Domain, bool) {
	x := b.x
	i, ok := x.pos[id]
	if !ok {
		return nil, false
	}
	if _, seen := b.orig[id]; !seen {
		old := x.c.Domains[i]
		b.orig[id] = origDomain{d: old, existed: true}
		b.order = append(b.order, id)
		x.c.Domains[i] = old.Clone()
		b.undo = append(b.undo, func() { x.c.Domains[x.pos[id]] = old })
	}
	return &x.c.Domains[i], true
}

func (b *batch) globalProps() *[]config.Property {
	x := b.x
	if !b.globals {
		b.globals = true
		old := x.c.Properties
		b.origGlobals = old
		x.c.Properties = slices.Clone(old)
		b.undo = append(b.undo, func() { x.c.Properties = old })
	}
	return &x.c.Properties
}

func (b *batch) labelList() *[]config.Label {
	x := b.x
	if !b.labels {
		b.labels = true
		old := x.c.Labels
		b.origLabels = old
		x.c.Labels = slices.Clone(old)
		b.undo = append(b.undo, func() { x.c.Labels = old })
	}
	return &x.c.Labels
}

// apply runs one op with config.Apply's semantics.
func (b *batch) apply(op config.Op) error {
	x := b.x
	switch op.Kind {
	case config.OpSetProperty, config.OpDelProperty, config.OpSetFeature, config.OpDelFeature,
		config.OpAddTag, config.OpDelTag, config.OpSetVolumeConfig, config.OpSetDevices, config.OpSetFirewall:
		d, ok := b.touch(op.Domain)
		if !ok {
			return fmt.Errorf("%w: %s", config.ErrNoSuchDomain, op.Domain)
		}
		applyToDomain(d, op)
	case config.OpSetGlobalProperty:
		ps := b.globalProps()
		*ps = setProp(*ps, op.Name, op.Value)
	case config.OpDelGlobalProperty:
		ps := b.globalProps()
		*ps = delProp(*ps, op.Name)
	case config.OpAddDomain:
		if op.New == nil {
			return fmt.Errorf("%w: add-domain without a domain", config.ErrBadOp)
		}
		id := op.New.ID
		if _, taken := x.pos[id]; taken {
			return errSlowPath
		}
		if _, seen := b.orig[id]; !seen {
			b.orig[id] = origDomain{}
			b.order = append(b.order, id)
		}
		x.c.Domains = append(x.c.Domains, op.New.Clone())
		x.pos[id] = len(x.c.Domains) - 1
		b.undo = append(b.undo, func() {
			n := len(x.c.Domains) - 1
			x.c.Domains[n] = config.Domain{}
			x.c.Domains = x.c.Domains[:n]
			delete(x.pos, id)
		})
	case config.OpDelDomain:
		i, ok := x.pos[op.Domain]
		if !ok {
			return fmt.Errorf("%w: %s", config.ErrNoSuchDomain, op.Domain)
		}
		id := op.Domain
		removed := x.c.Domains[i]
		if _, seen := b.orig[id]; !seen {
			b.orig[id] = origDomain{d: removed, existed: true}
			b.order = append(b.order, id)
		}
		// The domain list is never shared (View copies it), so it may shift in place.
		x.c.Domains = slices.Delete(x.c.Domains, i, i+1)
		delete(x.pos, id)
		x.reposition(i)
		b.undo = append(b.undo, func() {
			x.c.Domains = slices.Insert(x.c.Domains, i, removed)
			x.reposition(i)
		})
	case config.OpAddLabel:
		if op.Label == nil {
			return fmt.Errorf("%w: add-label without a label", config.ErrBadOp)
		}
		ls := b.labelList()
		*ls = append(*ls, *op.Label)
	case config.OpDelLabel:
		ls := b.labelList()
		i := slices.IndexFunc(*ls, func(l config.Label) bool { return l.Name == op.Name })
		if i < 0 {
			return fmt.Errorf("%w: no label %s", config.ErrBadOp, op.Name)
		}
		*ls = slices.Delete(*ls, i, i+1)
	default:
		// A kind added to config after this was written: config.Apply knows it (or
		// refuses it with its own error).
		return errSlowPath
	}
	return nil
}

// applyToDomain changes a domain the batch owns (touch copied it).
func applyToDomain(d *config.Domain, op config.Op) {
	switch op.Kind {
	case config.OpSetProperty:
		d.Properties = setProp(d.Properties, op.Name, op.Value)
	case config.OpDelProperty:
		d.Properties = delProp(d.Properties, op.Name)
	case config.OpSetFeature:
		if i := slices.IndexFunc(d.Features, func(f config.Feature) bool { return f.Name == op.Name }); i >= 0 {
			d.Features[i].Value = op.Value
		} else {
			d.Features = append(d.Features, config.Feature{Name: op.Name, Value: op.Value})
		}
	case config.OpDelFeature:
		if i := slices.IndexFunc(d.Features, func(f config.Feature) bool { return f.Name == op.Name }); i >= 0 {
			d.Features = slices.Delete(d.Features, i, i+1)
		}
	case config.OpAddTag:
		if !slices.Contains(d.Tags, op.Name) {
			d.Tags = append(d.Tags, op.Name)
		}
	case config.OpDelTag:
		if i := slices.Index(d.Tags, op.Name); i >= 0 {
			d.Tags = slices.Delete(d.Tags, i, i+1)
		}
	case config.OpSetVolumeConfig:
		d.VolumeConfig = config.RawXML(op.Value)
	case config.OpSetDevices:
		d.Devices = config.SetDevicesElement(d.Devices, op.Name, config.RawXML(op.Value))
	case config.OpSetFirewall:
		d.Firewall = op.Value
	}
}

func setProp(ps []config.Property, name, value string) []config.Property {
	if i := slices.IndexFunc(ps, func(p config.Property) bool { return p.Name == name }); i >= 0 {
		ps[i].Value = value
		return ps
	}
	return append(ps, config.Property{Name: name, Value: value})
}

func delProp(ps []config.Property, name string) []config.Property {
	if i := slices.IndexFunc(ps, func(p config.Property) bool { return p.Name == name }); i >= 0 {
		return slices.Delete(ps, i, i+1)
	}
	return ps
}
