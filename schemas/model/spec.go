package model

import (
	"slices"
	"strings"

	"github.com/qubesbus/qubesbus/schemas/config"
)

// Spec is the definition of one property of one holder class.
type Spec struct {
	Name      string
	Type      string // API type: bool, int, str, vm, label
	Kind      Kind   // parser of untrusted text
	Stage     int    // load stage: 2, 3 (global) or 4; also the List order
	WriteOnce bool   // can be assigned only while unset; later Set/Reset abort
	ReadOnly  bool   // the setter forbids assignment (computed, stateless, fixed)
	AllowNone bool   // qube reference that may be none
	Target    string // qube reference: class the referenced qube must have
	Help      string

	// Default computes the value of an unset property; false: no value at all.
	Default func(m *Model, h Holder) (Value, bool)
	// Setter validates and normalises a parsed value before any event is fired.
	Setter func(m *Model, h Holder, v Value) (Value, error)
	// Veto runs after the pre-set event was fired (qubesd's pre-set handlers).
	Veto func(m *Model, h Holder, v Value) error
	// ResetCheck refuses a Reset before any event (where qubesd's own reset leaves a
	// state it cannot read back or save).
	ResetCheck func(m *Model, h Holder) error
	// ResetVeto runs after the pre-reset event was fired.
	ResetVeto func(m *Model, h Holder) error
	// ResetPreSide runs after ResetVeto: the events the pre-reset handlers fire (they
	// follow property-pre-reset and precede property-pre-del), and a veto among them.
	ResetPreSide func(m *Model, h Holder, old Value, oldOK bool) ([]Event, error)
	// PreSide runs after Veto: the events the pre-set handlers fire themselves (they
	// follow property-pre-set on the wire), and a veto raised among them.
	PreSide func(m *Model, h Holder, old Value, oldOK bool, v Value) ([]Event, error)
	// Side returns the ops and events of the handlers of the post-set event, fired
	// before property-set itself.
	Side func(m *Model, h Holder, old Value, oldOK bool, v Value) ([]Event, []config.Op)
	// ResetSide is Side for the post-reset event: its events precede property-reset.
	ResetSide func(m *Model, h Holder, old Value, oldOK bool) ([]Event, []config.Op)
}

// VMClasses are the qube classes in qubesd's registry order (admin.vmclass.List).
var VMClasses = []string{"AppVM", "TemplateVM", "StandaloneVM", "AdminVM", "DispVM", "RemoteVM"}

var classCode = map[byte]string{
	'A': "AppVM", 'T': "TemplateVM", 'S': "StandaloneVM", 'D': "DispVM",
	'0': "AdminVM", 'R': "RemoteVM", 'G': GlobalHolder,
}

// specs holds each class's properties in List order: by (load stage, name).
var specs = map[string][]*Spec{}
var specIndex = map[string]map[string]*Spec{}

// define registers a spec for the classes named by codes (see classCode). It panics on
// a duplicate, because the table is a programming error found at start-up.
func define(codes string, s Spec) {
	for i := 0; i < len(codes); i++ {
		class, ok := classCode[codes[i]]
		if !ok {
			panic("model: unknown class code " + string(codes[i]))
		}
		if specIndex[class] == nil {
			specIndex[class] = map[string]*Spec{}
		}
		if _, dup := specIndex[class][s.Name]; dup {
			panic("model: property " + s.Name + " defined twice for " + class)
		}
		cp := s
		specIndex[class][s.Name] = &cp
		specs[class] = append(specs[class], &cp)
	}
}

func sortSpecs() {
	for _, list := range specs {
		slices.SortFunc(list, func(a, b *Spec) int {
			if a.Stage != b.Stage {
				return a.Stage - b.Stage
			}
			return strings.Compare(a.Name, b.Name)
		})
	}
}

// SpecOf returns the definition of prop for class ("Qubes" for global), or nil.
func SpecOf(class, prop string) *Spec { return specIndex[class][prop] }

// SpecsOf returns the properties of a class in List order.
func SpecsOf(class string) []*Spec { return specs[class] }

// ListText is the List reply of a class: one name per line.
func ListText(class string) string {
	var b strings.Builder
	for _, s := range specs[class] {
		b.WriteString(s.Name)
		b.WriteByte('\n')
	}
	return b.String()
}

// HasProperty reports whether a class has a property.
func HasProperty(class, prop string) bool { return SpecOf(class, prop) != nil }
