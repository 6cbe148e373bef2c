package model

import (
	"github.com/qubesbus/qubesbus/bus/qerr"
	"github.com/qubesbus/qubesbus/schemas/config"
)

// The handlers of qubesd's network properties (qubes/vm/mix/net.py and the core
// features extension): which checks run in the setter (before any event) and which in
// a pre-event handler, and what each change re-announces.

// netvmSetter is qubesd's netvm setter: the target must provide network and must not
// close a loop. It runs before any event. dom0 has no provides_network at all (qubesd
// crashes on it); it is refused as a qube that does not provide network.
func netvmSetter(m *Model, h Holder, v Value) (Value, error) {
	if v.None {
		return v, nil
	}
	target := m.Domain(v.Text)
	if target == nil {
		return v, nil
	}
	if !m.ProvidesNetwork(target) {
		return v, qerr.ValueError("The " + target.Name() + " qube does not provide network")
	}
	if target == h.D || m.netChainHas(target, h.D) {
		return v, qerr.ValueError("Loops in network are unsupported")
	}
	return v, nil
}

// netvmVeto is the property-pre-set:netvm handler: a running qube cannot be attached
// to a halted one.
func netvmVeto(m *Model, h Holder, v Value) error {
	if v.None {
		return nil
	}
	if target := m.Domain(v.Text); target != nil && m.running(h.D) && !m.running(target) {
		return qerr.VMNotStartedError("Cannot dynamically attach to stopped qube " + target.Name())
	}
	return nil
}

// netvmResetPre is the property-pre-reset:netvm handler: the setter's checks against
// the default, then, if the default differs from the current value, property-pre-set:
// netvm with its own handler's check.
func netvmResetPre(m *Model, h Holder, old Value, oldOK bool) ([]Event, error) {
	v, ok := m.defaultOf(h, SpecOf(h.Class(), "netvm"))
	if !ok {
		return nil, nil
	}
	if _, err := netvmSetter(m, h, v); err != nil {
		return nil, err
	}
	if oldOK && old == v {
		return nil, nil
	}
	evs := []Event{Ev(h.VM(), "property-pre-set:netvm", "name", "netvm", "newvalue", v.EventText(), "oldvalue", oldText(old, oldOK))}
	return evs, netvmVeto(m, h, v)
}

// netvmResetSide is the property-reset:netvm handler: property-set:netvm when the
// effective value changed.
func netvmResetSide(m *Model, h Holder, old Value, oldOK bool) ([]Event, []config.Op) {
	v, ok := m.defaultOf(h, SpecOf(h.Class(), "netvm"))
	if !ok || (oldOK && old == v) {
		return nil, nil
	}
	return []Event{Ev(h.VM(), "property-set:netvm", "name", "netvm", "newvalue", v.EventText(), "oldvalue", oldText(old, oldOK))}, nil
}

// oldText is an oldvalue argument qubesd passes explicitly (None when there was none).
func oldText(old Value, oldOK bool) string {
	if !oldOK {
		return "None"
	}
	return old.EventText()
}

// providesNetworkSetter is qubesd's setter: False is refused while qubes use this one
// as their netvm. Reset does not run it.
func providesNetworkSetter(m *Model, h Holder, v Value) (Value, error) {
	if v.Text != "True" && len(m.ConnectedTo(h.D)) > 0 {
		return v, qerr.ValueError("The qube is still used by other qubes, change theirs 'netvm' first")
	}
	return v, nil
}

// servicevmSync is the core features extension's handler of property-set and
// property-reset of provides_network: the feature servicevm follows the effective
// value (set to "1" every time, removed if present), and the icon is announced.
func servicevmSync(h Holder, provides bool) ([]Event, []config.Op) {
	const f = "servicevm"
	vm := h.VM()
	if provides {
		kw := []string{"feature", f, "value", "1"}
		if old, ok := Feature(h.D, f); ok {
			kw = append(kw, "oldvalue", old)
		}
		return []Event{Ev(vm, "domain-feature-pre-set:"+f, kw...), Ev(vm, "domain-feature-set:"+f, kw...), resetEvent(h, "icon")},
			[]config.Op{{Kind: config.OpSetFeature, Domain: h.D.ID, Name: f, Value: "1"}}
	}
	if _, ok := Feature(h.D, f); !ok {
		return nil, nil
	}
	return []Event{Ev(vm, "domain-feature-pre-delete:"+f, "feature", f), Ev(vm, "domain-feature-delete:"+f, "feature", f), resetEvent(h, "icon")},
		[]config.Op{{Kind: config.OpDelFeature, Domain: h.D.ID, Name: f}}
}

// providesNetworkSide: the extension's handler (servicevm, icon) runs before the
// qube's own (gateway and gateway6, only when the value changed).
func providesNetworkSide(_ *Model, h Holder, old Value, oldOK bool, v Value) ([]Event, []config.Op) {
	evs, ops := servicevmSync(h, v.Text == "True")
	if !oldOK || old != v {
		evs = append(evs, resetEvent(h, "gateway"), resetEvent(h, "gateway6"))
	}
	return evs, ops
}

func providesNetworkResetSide(m *Model, h Holder, _ Value, _ bool) ([]Event, []config.Op) {
	v, _ := m.defaultOf(h, SpecOf(h.Class(), "provides_network"))
	return servicevmSync(h, v.Text == "True")
}

// ipSide is qubesd's handler of property-set:ip and property-reset:ip: when the
// value changed, gateway (if the qube provides network), visible_ip, and
// visible_gateway on every qube connected to it. (Its ip6 twin listens to
// property-set:ip6 but to property-reset:ipv6, a name never fired: resetting ip6
// announces nothing.)
func ipSide(family string) func(*Model, Holder, Value, bool, Value) ([]Event, []config.Op) {
	return func(m *Model, h Holder, old Value, oldOK bool, v Value) ([]Event, []config.Op) {
		if oldOK && old == v {
			return nil, nil
		}
		var evs []Event
		if m.ProvidesNetwork(h.D) {
			evs = append(evs, resetEvent(h, "gateway"+family))
		}
		evs = append(evs, resetEvent(h, "visible_ip"+family))
		for _, c := range m.ConnectedTo(h.D) {
			evs = append(evs, resetEvent(Holder{D: c}, "visible_gateway"+family))
		}
		return evs, nil
	}
}

// ipResetSide: property-reset:ip passes no newvalue, so the handler's "unchanged"
// test compares None with the old value: everything is announced unless the qube had
// no address (the default, even when it stays the same, counts as a change).
func ipResetSide(m *Model, h Holder, old Value, oldOK bool) ([]Event, []config.Op) {
	if !oldOK || old.None {
		return nil, nil
	}
	return ipSide("")(m, h, old, oldOK, None)
}
