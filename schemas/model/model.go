package model

import (
	"errors"
	"strconv"
	"strings"

	"github.com/qubesbus/qubesbus/bus/qerr"
	"github.com/qubesbus/qubesbus/schemas/config"
)

// Host is what the model needs to know of the machine: values qubesd reads from the
// hypervisor or the file system. The simulated host has fixed ones (DefaultHost).
type Host struct {
	MemoryMiB     int // total RAM (global maxmem); half of it caps a qube's default maxmem
	CPUs          int // global no_cpus
	Dom0MaxMemMiB int // dom0's maxmem
	// Kernels lists the installed kernels (directories under vm-kernels): true when
	// the kernel has its vmlinuz, false when the directory lacks it.
	Kernels map[string]bool
}

// DefaultHost is the simulated host the transcripts were recorded on.
var DefaultHost = Host{
	MemoryMiB:     16384,
	CPUs:          8,
	Dom0MaxMemMiB: 4096,
	Kernels:       map[string]bool{"6.12.40-1.fc41": true},
}

// Runtime holds the values of a qube that only the lifecycle service knows.
type Runtime struct {
	State       string // power state; "" means Halted
	XID         int    // -1 unless running
	StubdomXID  int    // -1 unless an HVM with a stub domain runs
	StubdomUUID string
	StartTime   string // "" when not running (None)
}

// Halted is the runtime of a qube that does not run.
var Halted = Runtime{State: "Halted", XID: -1, StubdomXID: -1}

// PowerState is the state of the runtime ("Halted" when unknown).
func (r Runtime) PowerState() string {
	if r.State == "" {
		return "Halted"
	}
	return r.State
}

// GlobalHolder is the name qubesd gives the app object in messages.
const GlobalHolder = "Qubes"

// AdminVMUUID is dom0's fixed UUID.
const AdminVMUUID = "00000000-0000-0000-0000-000000000000"

// Model evaluates properties over one configuration. It is cheap to build; build one
// per call while holding the configuration (it keeps pointers into it). A Model is
// not safe for concurrent use.
type Model struct {
	C       *config.Config
	Host    Host
	runtime func(name string) Runtime
	byName  map[string]*config.Domain
	lookup  func(string) *config.Domain // when set, used instead of byName
	depth   int
}

// New returns a model over c. runtime may be nil (every qube but dom0 halted).
func New(c *config.Config, host Host, runtime func(name string) Runtime) *Model {
	return &Model{C: c, Host: host, runtime: runtime}
}

// NewIndexed is New with a name lookup the caller already keeps (the replica's), so
// the model never indexes every qube for a read of one.
func NewIndexed(c *config.Config, host Host, runtime func(name string) Runtime, byName func(string) *config.Domain) *Model {
	return &Model{C: c, Host: host, runtime: runtime, lookup: byName}
}

// Runtime returns the runtime values of a qube.
func (m *Model) Runtime(name string) Runtime {
	if m.runtime != nil {
		rt := m.runtime(name)
		if rt.State == "" {
			rt.State = "Halted"
		}
		return rt
	}
	return Halted
}

// PowerState returns the power state of a qube: dom0 and RemoteVMs are always Running.
func (m *Model) PowerState(name string) string {
	if d := m.Domain(name); d != nil && (d.Class == "AdminVM" || d.Class == "RemoteVM") {
		return "Running"
	}
	return m.Runtime(name).PowerState()
}

// Domain returns the qube named name, or nil.
func (m *Model) Domain(name string) *config.Domain {
	if m.lookup != nil {
		return m.lookup(name)
	}
	if m.byName == nil {
		m.byName = make(map[string]*config.Domain, len(m.C.Domains))
		for i := range m.C.Domains {
			m.byName[m.C.Domains[i].Name()] = &m.C.Domains[i]
		}
	}
	return m.byName[name]
}

// Holder is a property holder: a qube, or the global app object (D nil).
type Holder struct {
	D *config.Domain
}

// Global is the app object.
var Global = Holder{}

// IsGlobal reports whether h is the app object.
func (h Holder) IsGlobal() bool { return h.D == nil }

// Class is the class name used in messages ("Qubes" for the app object).
func (h Holder) Class() string {
	if h.D == nil {
		return GlobalHolder
	}
	return h.D.Class
}

// Name is the holder's name in messages ("Qubes" for the app object).
func (h Holder) Name() string {
	if h.D == nil {
		return GlobalHolder
	}
	return h.D.Name()
}

// VM is the event subject of the holder ("" for the app object).
func (h Holder) VM() string {
	if h.D == nil {
		return ""
	}
	return h.D.Name()
}

// Holder returns the holder for a qube name ("" or never for the app object).
func (m *Model) Holder(vm string) (Holder, error) {
	d := m.Domain(vm)
	if d == nil {
		return Holder{}, qerr.VMNotFoundError("No such domain: " + qerr.Repr(vm))
	}
	return Holder{D: d}, nil
}

func (m *Model) stored(h Holder, prop string) (string, bool) {
	if h.D == nil {
		for _, p := range m.C.Properties {
			if p.Name == prop {
				return p.Value, true
			}
		}
		return "", false
	}
	return h.D.Property(prop)
}

// Reading is a property as Get shows it.
type Reading struct {
	Spec     *Spec
	Value    Value
	Default  bool // nothing stored
	HasValue bool // false: neither a stored value nor a default
}

// Text is the Get reply: "default=‹True|False› type=‹t› ‹value›".
func (r Reading) Text() string {
	var b strings.Builder
	r.write(&b, false)
	return b.String()
}

// write appends Text to b; escaped, as GetAll shows it (backslash and newline escaped).
func (r Reading) write(b *strings.Builder, escaped bool) {
	b.WriteString("default=")
	if r.Default {
		b.WriteString("True")
	} else {
		b.WriteString("False")
	}
	b.WriteString(" type=")
	b.WriteString(r.Spec.Type)
	b.WriteByte(' ')
	if !r.HasValue {
		return
	}
	t := r.Value.String()
	if escaped && strings.ContainsAny(t, "\\\n") {
		t = strings.ReplaceAll(t, `\`, `\\`)
		t = strings.ReplaceAll(t, "\n", `\n`)
	}
	b.WriteString(t)
}

// NoSuchProperty is qubesd's error for an unknown property name.
func NoSuchProperty(h Holder, prop string) error {
	return qerr.NoSuchPropertyError("Invalid property " + qerr.Repr(prop) + " of " + h.Name())
}

// Spec returns the definition of a property of h.
func (m *Model) Spec(h Holder, prop string) (*Spec, error) {
	s := SpecOf(h.Class(), prop)
	if s == nil {
		return nil, NoSuchProperty(h, prop)
	}
	return s, nil
}

// Get reads a property of h.
func (m *Model) Get(h Holder, prop string) (Reading, error) {
	s, err := m.Spec(h, prop)
	if err != nil {
		return Reading{}, err
	}
	return m.read(h, s), nil
}

func (m *Model) read(h Holder, s *Spec) Reading {
	r := Reading{Spec: s}
	if text, ok := m.stored(h, s.Name); ok && !s.ReadOnly {
		r.Value, r.HasValue = decodeStored(s, text), true
		return r
	}
	r.Default = true
	r.Value, r.HasValue = m.defaultOf(h, s)
	return r
}

// decodeStored turns qubes.xml text into a value: empty text of a qube reference is
// None; bools and ints are shown normalised.
func decodeStored(s *Spec, text string) Value {
	switch s.Kind {
	case KindVM:
		if text == "" {
			return None
		}
	case KindBool:
		if b, err := ParseBool(text); err == nil {
			return Bool(b)
		}
	case KindInt:
		if n, ok := ParseBigInt(text); ok {
			return Text(n)
		}
	}
	return Text(text)
}

// Default evaluates the default of a property now, even if it is set.
func (m *Model) Default(h Holder, prop string) (Value, bool, error) {
	s, err := m.Spec(h, prop)
	if err != nil {
		return Value{}, false, err
	}
	v, ok := m.defaultOf(h, s)
	return v, ok, nil
}

// maxDepth bounds default chains (a template's value, a guivm's layout, a netvm chain)
// so that a malformed configuration cannot recurse forever.
const maxDepth = 32

func (m *Model) defaultOf(h Holder, s *Spec) (Value, bool) {
	if s.Default == nil {
		return Value{}, false
	}
	if m.depth > maxDepth {
		return None, true
	}
	m.depth++
	defer func() { m.depth-- }()
	return s.Default(m, h)
}

// Value returns the effective value of a property (stored or default) and whether it
// has one. Unknown properties have none.
func (m *Model) Value(h Holder, prop string) (Value, bool) {
	s := SpecOf(h.Class(), prop)
	if s == nil {
		return Value{}, false
	}
	r := m.read(h, s)
	return r.Value, r.HasValue
}

// Ref returns the qube a qube-valued property of h points to, or nil for none.
func (m *Model) Ref(h Holder, prop string) *config.Domain {
	v, ok := m.Value(h, prop)
	if !ok || v.None || v.Text == "" {
		return nil
	}
	return m.Domain(v.Text)
}

// Bool returns a bool property's effective value (false when it has none).
func (m *Model) Bool(h Holder, prop string) bool {
	v, ok := m.Value(h, prop)
	return ok && v.Text == "True"
}

// Int returns an int property's effective value and whether it has one.
func (m *Model) Int(h Holder, prop string) (int, bool) {
	v, ok := m.Value(h, prop)
	if !ok || v.None {
		return 0, false
	}
	n, err := strconv.Atoi(v.Text)
	if errors.Is(err, strconv.ErrRange) {
		// Python integers have no bound: a value past int's range is read as the
		// nearest int (Atoi returns it), which no machine's memory or timeout reaches.
		return n, true
	}
	return n, err == nil
}

// GetAll returns the readings of every property of h in List order.
func (m *Model) GetAll(h Holder) []Reading {
	specs := SpecsOf(h.Class())
	out := make([]Reading, len(specs))
	for i, s := range specs {
		out[i] = m.read(h, s)
	}
	return out
}

// GetAllText renders GetAll's reply: "‹name› ‹Get text›\n" per property, with \ and
// newline escaped.
func (m *Model) GetAllText(h Holder) string {
	rs := m.GetAll(h)
	var b strings.Builder
	b.Grow(64 * len(rs)) // a qube's GetAll is about 3 KiB; one allocation, not a dozen
	for _, r := range rs {
		b.WriteString(r.Spec.Name)
		b.WriteByte(' ')
		r.write(&b, true)
		b.WriteByte('\n')
	}
	return b.String()
}
