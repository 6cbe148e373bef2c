package model

import (
	"strings"

	"github.com/qubesbus/qubesbus/bus/qerr"
	"github.com/qubesbus/qubesbus/schemas/config"
)

// Parse turns an untrusted Set payload into a value of the property's kind, with
// qubesd's sanitising errors (docs/spec/properties.md §3, step 2).
func Parse(s *Spec, payload []byte) (Value, error) {
	if s.Kind == KindVM {
		if !isASCII(payload) {
			return Value{}, qerr.ValueError("")
		}
		if len(payload) == 0 {
			return None, nil
		}
		name := string(payload)
		if err := ValidateName(name); err != nil {
			return Value{}, err
		}
		return Text(name), nil
	}
	if !isASCII(payload) {
		return Value{}, qerr.ValueError("Non-ASCII bytes in property value")
	}
	text := string(payload)
	fail := func() error {
		return qerr.ValueError("Failed to parse property value as " + s.Kind.parserName())
	}
	switch s.Kind {
	case KindBool:
		b, err := ParseBool(text)
		if err != nil {
			return Value{}, err
		}
		return Bool(b), nil
	case KindInt:
		n, ok := ParseBigInt(text)
		if !ok {
			return Value{}, fail()
		}
		return Text(n), nil
	case KindIPv4:
		a, ok := ParseIPv4(text)
		if !ok {
			return Value{}, fail()
		}
		return Text(a), nil
	case KindIPv6:
		a, ok := ParseIPv6(text)
		if !ok {
			return Value{}, fail()
		}
		return Text(a), nil
	case KindUUID:
		u, ok := ParseUUID(text)
		if !ok {
			return Value{}, fail()
		}
		return Text(u), nil
	}
	if !IsPrintable(text) {
		return Value{}, qerr.ValueError("Invalid characters in property value")
	}
	return Text(text), nil
}

// reprAddress stands for the memory address Python's repr of an object shows; it
// cannot be reproduced, so a fixed one in the same form is used.
const reprAddress = "0x7f0000000000"

// Repr is Python's repr of a holder as qubesd's messages embed it: for a qube its
// class, name and qid, then every other property that has a value, in List order, as
// str() shows it (None, True, a qube's or label's name, "" for empty text).
func (m *Model) Repr(h Holder) string {
	if h.IsGlobal() {
		return "<qubes.app.Qubes object at " + reprAddress + ">"
	}
	var b strings.Builder
	qid := "0"
	if h.D.Class != "AdminVM" {
		qid, _ = h.D.Property("qid")
	}
	b.WriteString("<" + h.D.Class + " at " + reprAddress + " name=" + qerr.Repr(h.D.Name()) + " qid=" + qid + " ")
	first := true
	for _, s := range SpecsOf(h.D.Class) {
		if s.Name == "name" || s.Name == "qid" {
			continue
		}
		r := m.read(h, s)
		if !r.HasValue {
			continue
		}
		if !first {
			b.WriteByte(' ')
		}
		first = false
		b.WriteString(s.Name + "=" + r.Value.EventText())
	}
	b.WriteByte('>')
	return b.String()
}

func (m *Model) resolveRef(h Holder, s *Spec, v Value) error {
	if v.None {
		if !s.AllowNone {
			return propErr("Invalid value None for property " + qerr.Repr(s.Name) + " of " + m.Repr(h))
		}
		return nil
	}
	d := m.Domain(v.Text)
	if d == nil {
		return propErr("Can't set " + s.Name + " to non-existing qube " + v.Text)
	}
	target := s.Target
	if target == "" && d.Class == "RemoteVM" {
		target = "LocalVM" // qubesd's default class of a qube reference
	}
	if target != "" && d.Class != target {
		return propErr("wrong VM class: domains[" + qerr.Repr(d.Name()) + "] is of type " + d.Class + " and not " + target)
	}
	return nil
}

func propertyOp(h Holder, name string, v Value) config.Op {
	text := v.Text
	if v.None {
		text = ""
	}
	if h.IsGlobal() {
		return config.Op{Kind: config.OpSetGlobalProperty, Name: name, Value: text}
	}
	return config.Op{Kind: config.OpSetProperty, Domain: h.D.ID, Name: name, Value: text}
}

func delPropertyOp(h Holder, name string) config.Op {
	if h.IsGlobal() {
		return config.Op{Kind: config.OpDelGlobalProperty, Name: name}
	}
	return config.Op{Kind: config.OpDelProperty, Domain: h.D.ID, Name: name}
}

// Set plans admin.vm.property.Set / admin.property.Set. An error is returned for
// failures before any event; vetoes after the pre-set event are in Change.Err.
func (m *Model) Set(h Holder, prop string, payload []byte) (*Change, error) {
	s, err := m.Spec(h, prop)
	if err != nil {
		return nil, err
	}
	v, err := Parse(s, payload)
	if err != nil {
		return nil, err
	}
	if s.WriteOnce {
		if _, set := m.stored(h, s.Name); set {
			return nil, qerr.Abort("property " + s.Name + " is write-once")
		}
	}
	if s.ReadOnly {
		return nil, propErr("property " + qerr.Repr(s.Name) + " on " + h.Class() + " instance cannot be set")
	}
	if s.Kind == KindVM {
		if err := m.resolveRef(h, s, v); err != nil {
			return nil, err
		}
	}
	if s.Setter != nil {
		if v, err = s.Setter(m, h, v); err != nil {
			return nil, err
		}
	}
	if !XMLSafe(v.Text) {
		// Python's printable set holds \v and \f, which qubes.xml cannot hold: qubesd
		// takes the value, announces it, then crashes saving qubes.xml and keeps it in
		// memory only. Refused here, before any event, as qubesd's sanitiser refuses
		// the other control characters (issue 15, class 8).
		return nil, qerr.ValueError("Invalid characters in property value")
	}
	before := m.read(h, s)
	kw := []string{"name", s.Name, "newvalue", v.EventText()}
	if before.HasValue {
		kw = append(kw, "oldvalue", before.Value.EventText())
	}
	ch := &Change{Pre: []Event{Ev(h.VM(), "property-pre-set:"+s.Name, kw...)}}
	if s.Veto != nil {
		if ch.Err = s.Veto(m, h, v); ch.Err != nil {
			return ch, nil
		}
	}
	if s.PreSide != nil {
		evs, err := s.PreSide(m, h, before.Value, before.HasValue, v)
		ch.Pre = append(ch.Pre, evs...)
		if err != nil {
			ch.Err = err
			return ch, nil
		}
	}
	ch.Ops = []config.Op{propertyOp(h, s.Name, v)}
	if s.Side != nil {
		evs, ops := s.Side(m, h, before.Value, before.HasValue, v)
		ch.Post = append(ch.Post, evs...)
		ch.Ops = append(ch.Ops, ops...)
	}
	ch.Post = append(ch.Post, Ev(h.VM(), "property-set:"+s.Name, kw...))
	return ch, nil
}

// Reset plans admin.vm.property.Reset / admin.property.Reset.
func (m *Model) Reset(h Holder, prop string) (*Change, error) {
	s, err := m.Spec(h, prop)
	if err != nil {
		return nil, err
	}
	if s.WriteOnce {
		if _, set := m.stored(h, s.Name); set {
			return nil, qerr.Abort("property " + s.Name + " is write-once")
		}
	}
	if s.ResetCheck != nil {
		if err := s.ResetCheck(m, h); err != nil {
			return nil, err
		}
	}
	before := m.read(h, s)
	kw := []string{"name", s.Name}
	if before.HasValue {
		kw = append(kw, "oldvalue", before.Value.EventText())
	}
	ch := &Change{Pre: []Event{Ev(h.VM(), "property-pre-reset:"+s.Name, kw...)}}
	if s.ResetVeto != nil {
		if ch.Err = s.ResetVeto(m, h); ch.Err != nil {
			return ch, nil
		}
	}
	if s.ResetPreSide != nil {
		evs, err := s.ResetPreSide(m, h, before.Value, before.HasValue)
		ch.Pre = append(ch.Pre, evs...)
		if err != nil {
			ch.Err = err
			return ch, nil
		}
	}
	ch.Pre = append(ch.Pre, Ev(h.VM(), "property-pre-del:"+s.Name, kw...))
	if _, set := m.stored(h, s.Name); set {
		ch.Ops = []config.Op{delPropertyOp(h, s.Name)}
	}
	if s.ResetSide != nil {
		evs, ops := s.ResetSide(m, h, before.Value, before.HasValue)
		ch.Post = append(ch.Post, evs...)
		ch.Ops = append(ch.Ops, ops...)
	}
	ch.Post = append(ch.Post,
		Ev(h.VM(), "property-reset:"+s.Name, kw...),
		Ev(h.VM(), "property-del:"+s.Name, kw...))
	return ch, nil
}

// XMLSafe reports whether text can be written to qubes.xml (XML 1.0 forbids control
// characters other than tab, newline and carriage return).
func XMLSafe(text string) bool {
	for i := 0; i < len(text); i++ {
		if c := text[i]; c < 0x20 && c != '\t' && c != '\n' && c != '\r' {
			return false
		}
	}
	return true
}
