package model

import (
	"strconv"

	"github.com/qubesbus/qubesbus/schemas/config"
)

// Value is a property value as qubesd holds it: text as str() renders it, or None.
type Value struct {
	Text string
	None bool
}

// Text returns a value holding s.
func Text(s string) Value { return Value{Text: s} }

// None is Python's None.
var None = Value{None: true}

// Bool renders a bool as Python does.
func Bool(b bool) Value {
	if b {
		return Value{Text: "True"}
	}
	return Value{Text: "False"}
}

// Int renders an int.
func Int(n int) Value { return Value{Text: strconv.Itoa(n)} }

// String is the text of the value in property replies: None is empty.
func (v Value) String() string {
	if v.None {
		return ""
	}
	return v.Text
}

// EventText is the text of the value in event arguments: None is "None".
func (v Value) EventText() string {
	if v.None {
		return "None"
	}
	return v.Text
}

// Event is one Qubes event a change fires: VM is the qube name ("" for global), Name
// the wire name, Kwargs alternating keys and values in qubesd's order.
type Event struct {
	VM     string
	Name   string
	Kwargs []string
}

// Ev builds an event.
func Ev(vm, name string, kv ...string) Event { return Event{VM: vm, Name: name, Kwargs: kv} }

// Change is the plan of one write call. The service publishes Pre, then returns Err
// if it is set (a veto raised after the pre-events were fired, as qubesd streams
// pre-events before its validators run); otherwise it applies Ops, publishes Post and
// replies Reply.
type Change struct {
	Pre   []Event
	Err   error
	Ops   []config.Op
	Post  []Event
	Reply string
}
