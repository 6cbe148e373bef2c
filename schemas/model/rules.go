package model

import (
	"fmt"
	"regexp"
	"slices"
	"strings"

	"github.com/qubesbus/qubesbus/bus/qerr"
	"github.com/qubesbus/qubesbus/schemas/config"
)

// Domains returns every qube in qubesd's collection order: dom0 first, then by name.
func (m *Model) Domains() []*config.Domain {
	out := make([]*config.Domain, len(m.C.Domains))
	for i := range m.C.Domains {
		out[i] = &m.C.Domains[i]
	}
	slices.SortStableFunc(out, func(a, b *config.Domain) int {
		if x, y := a.Class == "AdminVM", b.Class == "AdminVM"; x != y {
			if x {
				return -1
			}
			return 1
		}
		return strings.Compare(a.Name(), b.Name())
	})
	return out
}

func resetEvent(h Holder, prop string) Event {
	return Ev(h.VM(), "property-reset:"+prop, "name", prop)
}

func resetIcon(_ *Model, h Holder, _ Value, _ bool, _ Value) ([]Event, []config.Op) {
	if h.D == nil || h.D.Class == "AdminVM" {
		return nil, nil
	}
	return []Event{resetEvent(h, "icon")}, nil
}

// tagSync keeps the tag "‹prop›-‹qube›" (guivm-dom0, audiovm-dom0) in step with the
// property, as qubesd's GUI and audio extensions do.
func tagSync(prop string) func(*Model, Holder, Value, bool, Value) ([]Event, []config.Op) {
	return func(m *Model, h Holder, old Value, oldOK bool, v Value) ([]Event, []config.Op) {
		var evs []Event
		var ops []config.Op
		if oldOK && !old.None && old.Text != "" && (v.None || old.Text != v.Text) {
			tag := prop + "-" + old.Text
			if HasTag(h.D, tag) {
				evs = append(evs, Ev(h.VM(), "domain-tag-delete:"+tag, "tag", tag))
				ops = append(ops, config.Op{Kind: config.OpDelTag, Domain: h.D.ID, Name: tag})
			}
		}
		if !v.None && v.Text != "" {
			tag := prop + "-" + v.Text
			if !HasTag(h.D, tag) {
				evs = append(evs, Ev(h.VM(), "domain-tag-add:"+tag, "tag", tag))
				ops = append(ops, config.Op{Kind: config.OpAddTag, Domain: h.D.ID, Name: tag})
			}
		}
		return evs, ops
	}
}

// templateChildReset tells the qubes based on a template that follow its value of
// prop that the value changed.
func templateChildReset(prop string) func(*Model, Holder, Value, bool, Value) ([]Event, []config.Op) {
	return func(m *Model, h Holder, old Value, oldOK bool, v Value) ([]Event, []config.Op) {
		if h.D == nil || h.D.Class != "TemplateVM" || (oldOK && old == v) {
			return nil, nil
		}
		var evs []Event
		for _, d := range m.Domains() {
			if m.Template(d) != h.D {
				continue
			}
			if _, set := d.Property(prop); !set {
				evs = append(evs, resetEvent(Holder{D: d}, prop))
			}
		}
		return evs, nil
	}
}

func ipSide(m *Model, h Holder, _ Value, _ bool, _ Value) ([]Event, []config.Op) {
	evs := []Event{resetEvent(h, "visible_ip")}
	if m.ProvidesNetwork(h.D) {
		evs = append(evs, resetEvent(h, "gateway"))
		for _, c := range m.ConnectedTo(h.D) {
			evs = append(evs, resetEvent(Holder{D: c}, "visible_gateway"))
		}
	}
	return evs, nil
}

func dispvmSetter(prop string) func(*Model, Holder, Value) (Value, error) {
	return func(m *Model, h Holder, v Value) (Value, error) {
		if v.None || m.templateForDispVMs(m.Domain(v.Text)) {
			return v, nil
		}
		if h.IsGlobal() {
			return v, propErr(fmt.Sprintf("Cannot set invalid property to system, %s '%s' has template_for_dispvms set to False", prop, v.Text))
		}
		return v, propErr(fmt.Sprintf("Cannot set invalid property to qube '%s', %s '%s' has template_for_dispvms set to False", h.Name(), prop, v.Text))
	}
}

var interfacesRe = regexp.MustCompile(`\A([bump*][0-9a-f*]{6})*\z`)

func devicesDeniedSetter(_ *Model, _ Holder, v Value) (Value, error) {
	s := v.Text
	if s == "" {
		return Text(""), nil
	}
	if len(s)%7 != 0 {
		return v, qerr.ValueError(fmt.Sprintf("Invalid length of interfaces=%s (is %d, expected multiple of 7)", qerr.Repr(s), len(s)))
	}
	if !interfacesRe.MatchString(s) {
		return v, qerr.ValueError(`Interface code list should be in the form chhhhhhchhhhhh...,where c is one of "b", "u", "m", "p", "*" and h is a hexdigit or "*".`)
	}
	return Text(NormaliseInterfaces(s)), nil
}

// NormaliseInterfaces de-duplicates and sorts a concatenation of 7-character device
// interface codes.
func NormaliseInterfaces(s string) string {
	var codes []string
	for i := 0; i+7 <= len(s); i += 7 {
		codes = append(codes, s[i:i+7])
	}
	slices.Sort(codes)
	return strings.Join(slices.Compact(codes), "")
}

func kernelSetter(m *Model, _ Holder, v Value) (Value, error) {
	k := v.Text
	if k == "" {
		return Text(""), nil
	}
	if strings.Contains(k, "/") {
		return v, propErr("Kernel name cannot contain '/'")
	}
	return v, m.kernelInstalled(k)
}

// kernelInstalled checks that kernel k is installed with its vmlinuz file.
func (m *Model) kernelInstalled(k string) error {
	ok, installed := m.Host.Kernels[k]
	switch {
	case !installed:
		return propErr("Kernel '" + k + "' not installed")
	case !ok:
		return propErr("Kernel '" + k + "' not properly installed: missing 'vmlinuz' file")
	}
	return nil
}

// defaultKernelVeto is qubesd's pre-set handler of the global default_kernel: unlike
// the qube kernel setter it runs after property-pre-set:default_kernel was fired,
// and has no rule against '/' (such a name is simply not installed).
func defaultKernelVeto(m *Model, _ Holder, v Value) error {
	if v.None || v.Text == "" {
		return nil
	}
	return m.kernelInstalled(v.Text)
}

var (
	variantRe = regexp.MustCompile(`\A[a-zA-Z0-9_-]*\z`)
	optionsRe = regexp.MustCompile(`\A[a-zA-Z0-9_:,-]*\z`)
)

func keyboardLayoutSetter(_ *Model, _ Holder, v Value) (Value, error) {
	parts := strings.Split(v.Text, "+")
	if len(parts) != 3 {
		return v, propErr("invalid number of keyboard layout parameters")
	}
	if parts[0] == "" || strings.IndexFunc(parts[0], func(r rune) bool {
		return (r < 'a' || r > 'z') && (r < 'A' || r > 'Z')
	}) >= 0 {
		return v, propErr("Invalid keyboard layout provided")
	}
	if !variantRe.MatchString(parts[1]) {
		return v, propErr("Invalid layout variant provided")
	}
	if !optionsRe.MatchString(parts[2]) {
		return v, propErr("Invalid layout options provided")
	}
	return v, nil
}

func labelSetter(m *Model, _ Holder, v Value) (Value, error) {
	t := v.Text
	var l *config.Label
	if rest, ok := strings.CutPrefix(t, "label-"); ok {
		if n, ok := ParseInt(rest); ok {
			for i := range m.C.Labels {
				if int64(m.C.Labels[i].Index) == n {
					l = &m.C.Labels[i]
				}
			}
		}
	} else {
		l = m.LookupLabel(t)
	}
	if l == nil {
		return v, LabelNotFound(t)
	}
	return Text(l.Name), nil
}

// LabelNotFound is qubesd's error for an unknown label.
func LabelNotFound(text string) error {
	return qerr.LabelNotFoundError("Label does not exist: " + text)
}

func poolSetter(m *Model, _ Holder, v Value) (Value, error) {
	if !m.PoolExists(v.Text) {
		return v, propErr("No such storage pool")
	}
	return v, nil
}

func defaultIcon(m *Model, h Holder) (Value, bool) {
	label, ok := m.Value(h, "label")
	if !ok || label.None {
		return Value{}, false
	}
	prefix := "appvm-"
	servicevm, _ := Feature(h.D, "servicevm")
	switch {
	case h.D.Class == "TemplateVM":
		prefix = "templatevm-"
	case m.templateForDispVMs(h.D):
		prefix = "templatevm-"
	case servicevm != "":
		prefix = "servicevm-"
	case h.D.Class == "DispVM":
		prefix = "dispvm-"
	case h.D.Class == "StandaloneVM":
		prefix = "standalonevm-"
	case h.D.Class == "RemoteVM":
		prefix = "remotevm-"
	}
	return Text(prefix + label.Text), true
}

func defaultKernelopts(m *Model, h Holder) (Value, bool) {
	if k, ok := m.Value(h, "kernel"); !ok || k.String() == "" {
		return Text(""), true
	}
	if HasPCIDevices(h.D) {
		return Text(""), true
	}
	if t := m.Template(h.D); t != nil {
		if v, ok := m.Value(Holder{D: t}, "kernelopts"); ok {
			return v, true
		}
	}
	return Text(defaultKernelOpts), true
}

func (m *Model) memoryBalancingPossible(d *config.Domain) bool {
	if HasPCIDevices(d) {
		return false
	}
	if mode, _ := m.Value(Holder{D: d}, "virt_mode"); mode.Text == "hvm" {
		if v, ok := m.CheckFeature(d, "qrexec", true, false, false); !ok || v == "" {
			return false
		}
	}
	return true
}

func defaultMaxmem(m *Model, h Holder) (Value, bool) {
	if !m.memoryBalancingPossible(h.D) {
		return Int(0), true
	}
	limit := 4000
	if os, _ := Feature(h.D, "os"); os == "Linux" {
		mem, _ := m.Int(h, "memory")
		limit = mem * 10
	}
	limit = min(limit, m.Host.MemoryMiB/2)
	return withTemplate("maxmem", static(Int(limit)))(m, h)
}

func defaultBootmode(m *Model, h Holder) (Value, bool) {
	hasMode := func(mode string) bool {
		_, ok := m.CheckFeature(h.D, "boot-mode.kernelopts."+mode, true, false, false)
		return ok
	}
	if v, ok := m.CheckFeature(h.D, "boot-mode.active", true, false, false); ok && v != "" && hasMode(v) {
		return Text(v), true
	}
	if t := m.Template(h.D); t != nil && HasProperty(t.Class, "appvm_default_bootmode") {
		if v, ok := m.Value(Holder{D: t}, "appvm_default_bootmode"); ok && v.Text != "default" && hasMode(v.Text) {
			return v, true
		}
	}
	return Text("default"), true
}

func (m *Model) running(d *config.Domain) bool { return m.PowerState(d.Name()) != "Halted" }

func netvmVeto(m *Model, h Holder, v Value) error {
	if v.None {
		return nil
	}
	target := m.Domain(v.Text)
	if target == nil {
		return nil
	}
	if !m.ProvidesNetwork(target) {
		return qerr.ValueError("The " + target.Name() + " qube does not provide network")
	}
	if target == h.D || m.netChainHas(target, h.D) {
		return qerr.ValueError("Loops in network are unsupported")
	}
	if m.running(h.D) && !m.running(target) {
		return qerr.VMNotStartedError("Cannot dynamically attach to stopped qube " + target.Name())
	}
	return nil
}

func netvmResetVeto(m *Model, h Holder) error {
	v, ok := m.defaultOf(h, SpecOf(h.Class(), "netvm"))
	if !ok {
		return nil
	}
	return netvmVeto(m, h, v)
}

func providesNetworkVeto(m *Model, h Holder, v Value) error {
	if v.Text == "True" {
		return nil
	}
	if len(m.ConnectedTo(h.D)) > 0 {
		return qerr.ValueError("The qube is still used by other qubes, change theirs 'netvm' first")
	}
	return nil
}

func templateVeto(m *Model, h Holder, _ Value) error {
	if m.running(h.D) {
		return qerr.VMNotHaltedError("Cannot change template while qube is running")
	}
	if h.D.Class != "DispVM" {
		for _, d := range m.Domains() {
			if d.Class == "DispVM" && m.Template(d) == h.D && m.running(d) {
				// qubesd builds this error with a tuple as its message.
				return qerr.VMInUseError("('Cannot change template while there are running disposables based on this disposable template',)")
			}
		}
	}
	return nil
}

func templateForDispVMsVeto(m *Model, h Holder, v Value) error {
	if v.Text == "True" {
		return nil
	}
	name := h.D.Name()
	for _, p := range []string{"default_dispvm", "management_dispvm"} {
		if r := m.Ref(Global, p); r == h.D {
			return qerr.VMInUseError("Cannot change template_for_dispvms to False while it is in use by the system by any of these properties: default_dispvm, management_dispvm")
		}
	}
	for _, d := range m.Domains() {
		for _, p := range []string{"default_dispvm", "management_dispvm", "template"} {
			if val, ok := d.Property(p); ok && val == name && HasProperty(d.Class, p) {
				return qerr.VMInUseError("Cannot change template_for_dispvms to False while it is the disposable template of a qube by any of these properties: default_dispvm, management_dispvm, template")
			}
		}
	}
	return nil
}

// followers returns, in collection order, the qubes that have prop and leave it at
// its default: those qubesd's handlers of a global default change walk over.
func (m *Model) followers(prop string) []*config.Domain {
	var out []*config.Domain
	for _, d := range m.Domains() {
		if SpecOf(d.Class, prop) == nil {
			continue
		}
		if _, set := d.Property(prop); !set {
			out = append(out, d)
		}
	}
	return out
}

// defaultNetvmSetter refuses a default netvm that would close a loop for a qube that
// keeps its netvm at the default (templates included, as qubesd walks every qube
// with a netvm property). It is the property's setter in qubesd, so it fails before
// any event is fired.
func defaultNetvmSetter(m *Model, _ Holder, v Value) (Value, error) {
	if v.None {
		return v, nil
	}
	target := m.Domain(v.Text)
	if target == nil {
		return v, nil
	}
	for _, d := range m.followers("netvm") {
		if target == d || m.netChainHas(target, d) {
			return v, propErr("Network loop on " + qerr.Repr(d.Name()))
		}
	}
	return v, nil
}

// defaultNetvmPreSide re-fires the pre-set of netvm on every qube that follows the
// default; each one's netvm checks may veto the change.
func defaultNetvmPreSide(m *Model, _ Holder, old Value, oldOK bool, v Value) ([]Event, error) {
	oldText := "None"
	if oldOK {
		oldText = old.EventText()
	}
	var evs []Event
	for _, d := range m.followers("netvm") {
		evs = append(evs, Ev(d.Name(), "property-pre-set:netvm", "name", "netvm", "newvalue", v.EventText(), "oldvalue", oldText))
		if err := netvmVeto(m, Holder{D: d}, v); err != nil {
			return evs, err
		}
	}
	return evs, nil
}

// defaultNetvmSide tells every qube that follows the default netvm that it changed.
func defaultNetvmSide(m *Model, _ Holder, old Value, oldOK bool, _ Value) ([]Event, []config.Op) {
	oldText := "None"
	if oldOK {
		oldText = old.EventText()
	}
	var evs []Event
	for _, d := range m.followers("netvm") {
		evs = append(evs, Ev(d.Name(), "property-reset:netvm", "name", "netvm", "oldvalue", oldText))
	}
	return evs, nil
}

// globalRefire re-fires property-set:‹prop› on every qube that follows the global
// default, with the qube's own post-set handlers (tag sync) before each event.
func globalRefire(prop string) func(*Model, Holder, Value, bool, Value) ([]Event, []config.Op) {
	return func(m *Model, _ Holder, old Value, oldOK bool, v Value) ([]Event, []config.Op) {
		oldText := "None"
		if oldOK {
			oldText = old.EventText()
		}
		var evs []Event
		var ops []config.Op
		for _, d := range m.followers(prop) {
			h := Holder{D: d}
			if side := SpecOf(d.Class, prop).Side; side != nil {
				e, o := side(m, h, old, oldOK, v)
				evs = append(evs, e...)
				ops = append(ops, o...)
			}
			evs = append(evs, Ev(d.Name(), "property-set:"+prop, "name", prop, "newvalue", v.EventText(), "oldvalue", oldText))
		}
		return evs, ops
	}
}

// clockvmSide moves the clocksync service with the clock qube.
func clockvmSide(m *Model, _ Holder, old Value, oldOK bool, v Value) ([]Event, []config.Op) {
	const f = "service.clocksync"
	var evs []Event
	var ops []config.Op
	if !v.None {
		if d := m.Domain(v.Text); d != nil {
			if _, has := Feature(d, f); !has {
				evs = append(evs,
					Ev(d.Name(), "domain-feature-pre-set:"+f, "feature", f, "value", "1"),
					Ev(d.Name(), "domain-feature-set:"+f, "feature", f, "value", "1"))
				ops = append(ops, config.Op{Kind: config.OpSetFeature, Domain: d.ID, Name: f, Value: "1"})
			}
		}
	}
	if oldOK && !old.None && (v.None || old.Text != v.Text) {
		if d := m.Domain(old.Text); d != nil {
			if val, has := Feature(d, f); has && val != "" {
				evs = append(evs,
					Ev(d.Name(), "domain-feature-pre-delete:"+f, "feature", f),
					Ev(d.Name(), "domain-feature-delete:"+f, "feature", f))
				ops = append(ops, config.Op{Kind: config.OpDelFeature, Domain: d.ID, Name: f})
			}
		}
	}
	return evs, ops
}

func globalDispVMResetSide(m *Model, h Holder, old Value, oldOK bool) ([]Event, []config.Op) {
	return globalDispVMSide(m, h, old, oldOK, None)
}

// globalDispVMSide tells every qube that follows the global default_dispvm, passing
// the global's old value as qubesd's handler does (like the netvm/guivm/audiovm ones).
func globalDispVMSide(m *Model, _ Holder, old Value, oldOK bool, _ Value) ([]Event, []config.Op) {
	oldText := "None"
	if oldOK {
		oldText = old.EventText()
	}
	var evs []Event
	for _, d := range m.Domains() {
		s := SpecOf(d.Class, "default_dispvm")
		if s == nil || d.Class == "DispVM" {
			continue
		}
		if _, set := d.Property("default_dispvm"); !set {
			evs = append(evs, Ev(d.Name(), "property-reset:default_dispvm", "name", "default_dispvm", "oldvalue", oldText))
		}
	}
	return evs, nil
}
