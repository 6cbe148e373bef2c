package model

import (
	"fmt"
	"regexp"
	"slices"
	"strconv"
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
// property, as qubesd's GUI and audio extensions do on property-set and (with the new
// effective value) property-reset. The GUI handler removes every other guivm-… tag
// and adds the new one if missing; the audio handler removes every audiovm-… tag,
// the current one included, and adds the new one back. qubesd walks a set of tags;
// here they are walked sorted.
func tagSync(prop string) func(*Model, Holder, Value, bool, Value) ([]Event, []config.Op) {
	keepCurrent := prop == "guivm"
	return func(_ *Model, h Holder, _ Value, _ bool, v Value) ([]Event, []config.Op) {
		var evs []Event
		var ops []config.Op
		want := ""
		if !v.None && v.Text != "" {
			want = prop + "-" + v.Text
		}
		tags := slices.Clone(h.D.Tags)
		slices.Sort(tags)
		found := false
		for _, tag := range tags {
			if !strings.HasPrefix(tag, prop+"-") {
				continue
			}
			if keepCurrent && tag == want {
				found = true
				continue
			}
			evs = append(evs, Ev(h.VM(), "domain-tag-delete:"+tag, "tag", tag))
			ops = append(ops, config.Op{Kind: config.OpDelTag, Domain: h.D.ID, Name: tag})
		}
		if want != "" && !found {
			evs = append(evs, Ev(h.VM(), "domain-tag-add:"+want, "tag", want))
			ops = append(ops, config.Op{Kind: config.OpAddTag, Domain: h.D.ID, Name: want})
		}
		return evs, ops
	}
}

// keyboardLayoutSide is the GUI extension's handler of property-set:keyboard_layout:
// when the value changed, every qube whose guivm is this one and whose layout follows
// it is told, with the old value.
func keyboardLayoutSide(m *Model, h Holder, old Value, oldOK bool, v Value) ([]Event, []config.Op) {
	if oldOK && old == v {
		return nil, nil
	}
	var evs []Event
	for _, d := range m.Domains() {
		if !HasProperty(d.Class, "guivm") || m.Ref(Holder{D: d}, "guivm") != h.D {
			continue
		}
		if _, set := d.Property("keyboard_layout"); !set {
			evs = append(evs, Ev(d.Name(), "property-reset:keyboard_layout", "name", "keyboard_layout", "oldvalue", oldText(old, oldOK)))
		}
	}
	return evs, nil
}

// tagSyncReset is tagSync for property-reset: the handler reads the new effective
// value.
func tagSyncReset(prop string) func(*Model, Holder, Value, bool) ([]Event, []config.Op) {
	sync := tagSync(prop)
	return func(m *Model, h Holder, old Value, oldOK bool) ([]Event, []config.Op) {
		v, ok := m.defaultOf(h, SpecOf(h.Class(), prop))
		if !ok {
			v = None
		}
		return sync(m, h, old, oldOK, v)
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

// bootmodeFollowers are the qubes based on template t (in collection order) that
// leave bootmode at its default.
func (m *Model) bootmodeFollowers(t *config.Domain) []Event {
	var evs []Event
	for _, d := range m.Domains() {
		if m.Template(d) != t {
			continue
		}
		if _, set := d.Property("bootmode"); !set {
			evs = append(evs, resetEvent(Holder{D: d}, "bootmode"))
		}
	}
	return evs
}

// appvmBootmodeSide is the template's handler of property-set:appvm_default_bootmode
// (when the value changed) and property-reset:… (always).
func appvmBootmodeSide(m *Model, h Holder, old Value, oldOK bool, v Value) ([]Event, []config.Op) {
	if oldOK && old == v {
		return nil, nil
	}
	return m.bootmodeFollowers(h.D), nil
}

func appvmBootmodeResetSide(m *Model, h Holder, _ Value, _ bool) ([]Event, []config.Op) {
	return m.bootmodeFollowers(h.D), nil
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
		return v, propErr(`Interface code list should be in the form chhhhhhchhhhhh...,where c is one of "b", "u", "m", "p", "*" and h is a hexdigit or "*".`)
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

// kernelSetter is qubesd's setter of a qube's kernel: it only refuses a '/'. Whether
// the kernel is installed is checked by the property-pre-set handler (kernelVeto),
// after property-pre-set:kernel was fired.
func kernelSetter(_ *Model, _ Holder, v Value) (Value, error) {
	k := v.Text
	if k == "" {
		return Text(""), nil
	}
	if strings.Contains(k, "/") {
		return v, propErr("Kernel name cannot contain '/'")
	}
	return v, nil
}

// kernelVeto is the property-pre-set:kernel handler of qubes (and of the global
// default_kernel, which has no '/' rule: such a name is simply not installed).
func kernelVeto(m *Model, _ Holder, v Value) error {
	if v.None || v.Text == "" {
		return nil
	}
	return m.kernelInstalled(v.Text)
}

// kernelInstalled checks that kernel k is installed with its vmlinuz file.
func (m *Model) kernelInstalled(k string) error {
	ok, installed := m.Host.Kernels[k]
	switch {
	case !installed:
		return propErr("Kernel " + qerr.Repr(k) + " not installed")
	case !ok:
		return propErr("Kernel " + qerr.Repr(k) + " not properly installed: missing 'vmlinuz' file")
	}
	return nil
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
		// qubesd looks the number up and names it, as int() printed it, when it is
		// missing; text that is not a number crashes qubesd's setter, which is
		// answered here as a missing label.
		n, ok := ParseBigInt(rest)
		if !ok {
			return v, LabelNotFound(t)
		}
		for i := range m.C.Labels {
			if strconv.Itoa(m.C.Labels[i].Index) == n {
				l = &m.C.Labels[i]
			}
		}
		if l == nil {
			return v, LabelNotFound(n)
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
		if mem, ok := m.Int(h, "memory"); ok && mem < 1<<40 {
			limit = mem * 10
		} else if v, _ := m.Value(h, "memory"); IntSign(v.Text) > 0 {
			limit = m.Host.MemoryMiB // beyond any host: the half of RAM caps it below
		}
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

// maxmemVeto is the property-pre-set:maxmem handler: a change of a qube that is not
// halted is refused unless it uses memory hotplug. qubesd builds that error wrongly
// and crashes; here it is the QubesVMNotHaltedError it meant to raise.
func maxmemVeto(m *Model, h Holder, v Value) error {
	if old, ok := m.Value(h, "maxmem"); ok && old == v {
		return nil
	}
	if m.running(h.D) && !m.useMemoryHotplug(h.D) {
		return qerr.VMNotHaltedError("Can't change maxmem of VM " + h.D.Name() + ", because it isn't Halted and memory hotplug is forbidden")
	}
	return nil
}

// useMemoryHotplug: the feature memory-hotplug (template chain) decides; else never
// for HVM nor for a dom0-provided kernel (the simulated host's kernels do not
// advertise it); else the qube's advertised supported-feature.memory-hotplug.
func (m *Model) useMemoryHotplug(d *config.Domain) bool {
	if v, ok := m.CheckFeature(d, "memory-hotplug", true, false, false); ok {
		return v != ""
	}
	h := Holder{D: d}
	if mode, _ := m.Value(h, "virt_mode"); mode.Text == "hvm" {
		return false
	}
	if k, _ := m.Value(h, "kernel"); k.String() != "" {
		return false
	}
	v, ok := m.CheckFeature(d, "supported-feature.memory-hotplug", true, false, false)
	return ok && v != ""
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
	if v.Text == "True" || !m.Bool(h, "template_for_dispvms") {
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
	if target.Class == "AdminVM" {
		// qubesd takes it, then crashes announcing it to the qubes that follow the
		// default (dom0 cannot be a network provider), leaving it in memory unsaved.
		return v, qerr.ValueError("The " + target.Name() + " qube does not provide network")
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

// defaultNetvmSide fires property-reset:netvm, with the global's old value, on every
// qube that follows the default netvm. That event's handler first fires
// property-set:netvm when the qube's new netvm differs from that old value: a
// template (whose default netvm is none) always gets it when the old global value was
// a qube, the other qubes when the global one was unset.
func defaultNetvmSide(m *Model, _ Holder, old Value, oldOK bool, v Value) ([]Event, []config.Op) {
	oldText := "None"
	if oldOK {
		oldText = old.EventText()
	}
	var evs []Event
	for _, d := range m.followers("netvm") {
		now := v
		if d.Class == "TemplateVM" {
			now = None
		}
		if now.EventText() != oldText {
			evs = append(evs, Ev(d.Name(), "property-set:netvm", "name", "netvm", "newvalue", now.EventText(), "oldvalue", oldText))
		}
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

// layoutOverride is a planned change seen by layoutLoop: prop of d (nil: the global
// holder) set to value, or unset.
type layoutOverride struct {
	d     *config.Domain
	prop  string
	value string
	unset bool
}

func (m *Model) layoutStored(d *config.Domain, prop string, o layoutOverride) (string, bool) {
	if o.d == d && o.prop == prop {
		return o.value, !o.unset
	}
	if d == nil {
		return m.stored(Global, prop)
	}
	return d.Property(prop)
}

// layoutNext is the qube whose keyboard_layout d's follows, if it follows one: d
// leaves its own unset and has a GUI qube (its own guivm, or the global default_guivm)
// that has the property.
func (m *Model) layoutNext(d *config.Domain, o layoutOverride) *config.Domain {
	if d.Class == "AdminVM" || !HasProperty(d.Class, "keyboard_layout") || !HasProperty(d.Class, "guivm") {
		return nil
	}
	if _, set := m.layoutStored(d, "keyboard_layout", o); set {
		return nil
	}
	g, set := m.layoutStored(d, "guivm", o)
	if !set {
		if g, set = m.layoutStored(nil, "default_guivm", o); !set {
			g = "dom0"
		}
	}
	if g == "" {
		return nil
	}
	return m.Domain(g)
}

// layoutLoop finds a qube whose keyboard_layout would follow a chain of GUI qubes
// back to itself once o is made. qubesd takes such a guivm (a qube its own GUI qube,
// two qubes each other's, a default_guivm that follows the default itself) and then
// cannot read that keyboard_layout: its default recurses until Python gives up, and
// Get, GetAll and qvm-ls fail on the qube from then on (issue 15, class 8). Refused
// before any event instead.
func (m *Model) layoutLoop(o layoutOverride) error {
	n := len(m.C.Domains)
	for _, d := range m.Domains() {
		cur := d
		for range n + 1 {
			cur = m.layoutNext(cur, o)
			if cur == nil {
				break
			}
			if cur == d {
				return qerr.ValueError("Loops of GUI qubes are unsupported: keyboard_layout of qube " + qerr.Repr(d.Name()) + " would follow itself")
			}
		}
	}
	return nil
}

// layoutLoopSetter refuses a guivm (or default_guivm) that closes a loop.
func layoutLoopSetter(prop string) func(*Model, Holder, Value) (Value, error) {
	return func(m *Model, h Holder, v Value) (Value, error) {
		text := v.Text
		if v.None {
			text = ""
		}
		return v, m.layoutLoop(layoutOverride{d: h.D, prop: prop, value: text})
	}
}

// layoutLoopResetCheck refuses a Reset (of guivm, default_guivm or keyboard_layout)
// that closes a loop.
func layoutLoopResetCheck(prop string) func(*Model, Holder) error {
	return func(m *Model, h Holder) error {
		return m.layoutLoop(layoutOverride{d: h.D, prop: prop, unset: true})
	}
}
