// Package subject builds every NATS subject qubesbus uses. Subjects are never assembled
// by string concatenation elsewhere: services call these builders.
//
// Layout: qubes.v1.<host>.<kind>.…, so many hosts share one NATS cluster.
package subject

import "strings"

// Prefix is the versioned root of every qubesbus subject.
const Prefix = "qubes.v1"

// UnknownMethod is the API token for calls whose method is not in the registry: the
// service that resolves qubes answers them, so that source and destination errors still
// win over "no such method" as in qubesd.
const UnknownMethod = "_unknown"

// GlobalVM is the <vm-token> of events fired on the app object (no qube).
const GlobalVM = "_app"

// Host is the subject builder for one host.
type Host struct{ id string }

// ForHost returns the builder for a host id; the id becomes one bounded token (Token).
func ForHost(id string) Host { return Host{id: Token(id)} }

// AnyHost is the builder whose host token is the wildcard "*": each of its subjects
// matches that subject on every host (permissions, stream subjects).
func AnyHost() Host { return Host{id: "*"} }

// Rest is NATS's wildcard for every remaining token: Store(Rest) matches every
// operation of persistence's API, Service(s, Rest) every internal operation of s.
const Rest = ">"

// ID is the escaped host token.
func (h Host) ID() string { return h.id }

// API is the subject of an Admin API method, e.g. qubes.v1.local.api.admin.vm.List.
// The method name is used as is: only names from the method registry reach it (the
// gateway sends any other name to UnknownMethod and the name itself in a header), and
// registered names are short plain subject tokens.
func (h Host) API(method string) string { return Prefix + "." + h.id + ".api." + method }

// APIAll matches every API subject of the host.
func (h Host) APIAll() string { return Prefix + "." + h.id + ".api.>" }

// Cancel is where the gateway announces that the client of a request has gone. The
// request id becomes one bounded token (Token); a service matches the token, so any id
// works, also one too long to read back.
func (h Host) Cancel(requestID string) string {
	return Prefix + "." + h.id + ".cancel." + Token(requestID)
}

// CancelAll matches every cancel notice of the host.
func (h Host) CancelAll() string { return Prefix + "." + h.id + ".cancel.*" }

// Event is the subject of one event: vm is the qube name ("" for a global event). A
// wire name "base:suffix" (property-set:netvm) becomes two tokens, base.suffix, so
// permissions and filters can select an event family (events.*.property-set.>) even
// though NATS wildcards never match part of a token. Every token is bounded (Token):
// a client's tag or feature name of any length makes a subject of at most
// MaxEventSubject bytes, and the exact names travel in the event itself.
func (h Host) Event(vm, event string) string {
	base, suffix, found := strings.Cut(event, ":")
	s := h.EventsOf(vm) + "." + Token(base)
	if found {
		s += "." + Token(suffix)
	}
	return s
}

// EventsOf matches every event of one qube ("" for the global ones).
func (h Host) EventsOf(vm string) string {
	tok := GlobalVM
	if vm != "" {
		tok = Token(vm)
	}
	return Prefix + "." + h.id + ".events." + tok
}

// EventOfEveryVM matches one event of every qube, as a consumer filter or a
// permission: "domain-start", or with a suffix "property-set:netvm" (the tokens
// property-set.netvm, as Event makes them).
func (h Host) EventOfEveryVM(event string) string {
	base, suffix, found := strings.Cut(event, ":")
	s := Prefix + "." + h.id + ".events.*." + Token(base)
	if found {
		s += "." + Token(suffix)
	}
	return s
}

// EventsOfFilter is EventsOf followed by ".>" (a consumer filter).
func (h Host) EventsOfFilter(vm string) string { return h.EventsOf(vm) + ".>" }

// Events matches every event of the host.
func (h Host) Events() string { return Prefix + "." + h.id + ".events.>" }

// Store is a subject of persistence's own API, e.g. Store(configstore.OpSnapshot).
// Like Lab, Hypervisor and Service, its operation is a constant of the contract both
// sides share, never a client's name.
func (h Host) Store(op string) string { return Prefix + "." + h.id + ".store." + op }

// Config is the subject of the host's configuration change log.
func (h Host) Config() string { return Prefix + "." + h.id + ".config" }

// Lab is a subject of the simulated-hypervisor control API.
func (h Host) Lab(op string) string { return Prefix + "." + h.id + ".lab." + op }

// Hypervisor is a subject of the host's hypervisor driver API (the simulated
// hypervisor served over NATS), e.g. Hypervisor(hvbus.OpCreate).
func (h Host) Hypervisor(op string) string { return Prefix + "." + h.id + ".hv." + op }

// HypervisorNotices is the subject the host's hypervisor reports its notices on
// (domain stopped, paused, unpaused), kept in a stream so none is lost while the
// lifecycle service fails over.
func (h Host) HypervisorNotices() string { return Prefix + "." + h.id + ".hvnotice" }

// HypervisorDevices is the subject the host's hypervisor announces a change of a
// backend's devices on (a hot-plug or unplug; not stored: the devices service reads
// the device list again).
func (h Host) HypervisorDevices() string { return Prefix + "." + h.id + ".hvdevices" }

// AllHypervisorNotices matches every host's hypervisor notices.
func AllHypervisorNotices() string { return Prefix + ".*.hvnotice" }

// AllEvents matches every event of every host.
func AllEvents() string { return Prefix + ".*.events.>" }

// ParseEvent splits an event subject into host, vm ("" for global) and event name.
// It is not the source of truth: a name too long for a token (Token) was hashed and
// cannot be read back, so ParseEvent reports !ok for such a subject; the exact names
// are in the event (its subject and qubesevent extension: cloudevent.Decode).
func ParseEvent(subj string) (host, vm, event string, ok bool) {
	rest, found := strings.CutPrefix(subj, Prefix+".")
	if !found {
		return "", "", "", false
	}
	parts := strings.Split(rest, ".")
	if len(parts) < 4 || len(parts) > 5 || parts[1] != "events" {
		return "", "", "", false
	}
	var err error
	if host, err = UnescapeToken(parts[0]); err != nil {
		return "", "", "", false
	}
	if parts[2] != GlobalVM {
		if vm, err = UnescapeToken(parts[2]); err != nil {
			return "", "", "", false
		}
	}
	if event, err = UnescapeToken(parts[3]); err != nil || strings.Contains(event, ":") {
		return "", "", "", false
	}
	if len(parts) == 5 {
		suffix, err := UnescapeToken(parts[4])
		if err != nil {
			return "", "", "", false
		}
		event += ":" + suffix
	}
	return host, vm, event, true
}

// Service is a subject of a service's internal API (not the Admin API), e.g.
// Service(lifecycle.ServiceToken, lifecycle.OpStates): the service's token and the
// operation are constants of the service's contract (schemas/…), never spelled here.
func (h Host) Service(service, op string) string {
	return Prefix + "." + h.id + ".svc." + service + "." + op
}
