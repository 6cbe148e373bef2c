// Package model is the Qubes configuration model: every property of every qube class
// and of the global holder ("Qubes"), with its API type, parser, default rule, setter
// validation, write-once and read-only flags and help text; features, tags, labels,
// qube creation and removal. It is pure (no NATS, no I/O, no randomness): the
// properties service serves it over a replica of the configuration, and the lifecycle
// service reads effective values from it.
//
// Reading:
//
//	m := model.New(conf, model.DefaultHost, runtime) // runtime may be nil: all halted
//	h, _ := m.Holder("work")                         // or model.Global
//	r, _ := m.Get(h, "maxmem")                        // r.Text(): "default=True type=int 4000"
//	r, _ = m.Get(h, "netvm")                          // r.Value.String(), r.Default: "sys-firewall", false
//	n, ok := m.Int(h, "memory")                       // effective values, defaults included
//	netvm := m.NetVM(h.D)                             // *config.Domain or nil; also Template, Ref
//
// A Model keeps pointers into the configuration: build one per call while holding it
// (replica.View), never keep it.
//
// Writing: Set, Reset, FeatureSet, TagSet, LabelCreate, Create, Remove, … return a
// *Change: the events to publish before validation (Pre), a veto raised after them
// (Err), the config ops, and the events to publish once the ops are stored (Post).
// Errors returned directly happen before any event. Errors are *qerr.Error values with
// qubesd's exception class and exact message, or wrap qerr.ErrAbort where qubesd ends
// the call with an empty response.
package model
