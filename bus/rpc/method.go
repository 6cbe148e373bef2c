// Package rpc is the explicit Admin API method registry and the service side of a call:
// the options each method is registered with, the checks qubesd runs before a handler
// (in its order, with its texts), and a mux that serves handlers as NATS micro endpoints.
package rpc

import "fmt"

// Rule says whether a method takes an argument or a payload (qubesd's wants_arg and
// wants_payload: True, False or None).
type Rule uint8

const (
	// Any performs no check (qubesd None).
	Any Rule = iota
	// Required rejects an empty value (qubesd True).
	Required
	// Forbidden rejects a non-empty value (qubesd False).
	Forbidden
)

func (r Rule) String() string {
	switch r {
	case Any:
		return "any"
	case Required:
		return "required"
	case Forbidden:
		return "forbidden"
	}
	return fmt.Sprintf("Rule(%d)", uint8(r))
}

// DestRule says what the destination qube must be (qubesd's dest_adminvm).
type DestRule uint8

const (
	// AnyDest performs no check.
	AnyDest DestRule = iota
	// AdminVMDest requires the destination to be the AdminVM (dom0).
	AdminVMDest
	// NotAdminVMDest requires the destination not to be the AdminVM.
	NotAdminVMDest
)

func (d DestRule) String() string {
	switch d {
	case AnyDest:
		return "any"
	case AdminVMDest:
		return "adminvm"
	case NotAdminVMDest:
		return "not-adminvm"
	}
	return fmt.Sprintf("DestRule(%d)", uint8(d))
}

// Access is the policy class of a method: every method reads; some also write or execute.
type Access uint8

const (
	Read Access = iota
	Write
	Execute
)

func (a Access) String() string {
	switch a {
	case Read:
		return "read"
	case Write:
		return "write"
	case Execute:
		return "execute"
	}
	return fmt.Sprintf("Access(%d)", uint8(a))
}

// Service names a qubesbus service: the owner of a method in the registry, the
// `qubesbus serve` argument, the token of its internal subjects
// (subject.Host.Service) and, through Micro, its micro service. These are the only
// spellings of service names.
type Service string

const (
	Persistence Service = "persistence" // the configuration store (no Admin API methods)
	Hypervisor  Service = "hypervisor"  // the (simulated) hypervisor driver over NATS
	VMLifecycle Service = "vmlifecycle"
	Properties  Service = "properties"
	Storage     Service = "storage" // pools and volumes
	Devices     Service = "devices" // device assignments, attachments, deny lists and the firewall
	Backup      Service = "backup"  // backup profiles, archives of qubes (admin.backup.*)
	Gateway     Service = "gateway" // streams served by the gateway itself (admin.Events)
)

// Micro is the micro service name, and queue group, of every instance of the service.
func (s Service) Micro() string { return "qubesbus-" + string(s) }

// Method is one line of the registry: an Admin API method and its options.
type Method struct {
	Name          string
	Service       Service
	Arg           Rule
	Payload       Rule
	Dest          DestRule
	Cancellable   bool // stops when its client goes away (admin.Events, admin.vm.Stats)
	ChangesConfig bool // persistence saves qubes.xml after it succeeds
	Access        Access
}

// IsRead reports whether the method only reads: it neither writes nor executes, nor
// changes the configuration, so sending it again or serving it from any current
// instance is safe.
func (m Method) IsRead() bool { return m.Access == Read && !m.ChangesConfig }

// Validate reports a registry line that cannot be served.
func (m Method) Validate() error {
	switch {
	case m.Name == "":
		return fmt.Errorf("method without a name")
	case m.Service == "":
		return fmt.Errorf("method %q: no owner service", m.Name)
	case m.Arg > Forbidden || m.Payload > Forbidden:
		return fmt.Errorf("method %q: bad argument or payload rule", m.Name)
	case m.Dest > NotAdminVMDest:
		return fmt.Errorf("method %q: bad destination rule", m.Name)
	case m.Access > Execute:
		return fmt.Errorf("method %q: bad access class", m.Name)
	}
	for i := 0; i < len(m.Name); i++ {
		c := m.Name[i]
		if c <= ' ' || c > '~' || c == '*' || c == '>' || c == '+' {
			return fmt.Errorf("method %q: name is not a plain subject", m.Name)
		}
	}
	return nil
}

// Registry is an immutable set of methods, looked up by name.
type Registry struct {
	byName map[string]Method
	order  []string
}

// NewRegistry builds a registry; it panics on an invalid line or a duplicate name, naming
// both lines, because a broken table is a programming error found at start-up.
func NewRegistry(methods ...Method) *Registry {
	r := &Registry{byName: make(map[string]Method, len(methods))}
	for i, m := range methods {
		if err := m.Validate(); err != nil {
			panic(fmt.Sprintf("rpc: registry line %d: %v", i, err))
		}
		if _, dup := r.byName[m.Name]; dup {
			first := 0
			for j, n := range r.order {
				if n == m.Name {
					first = j
				}
			}
			panic(fmt.Sprintf("rpc: method %q registered twice (lines %d and %d)", m.Name, first, i))
		}
		r.byName[m.Name] = m
		r.order = append(r.order, m.Name)
	}
	return r
}

// Lookup returns the method registered under name.
func (r *Registry) Lookup(name string) (Method, bool) {
	m, ok := r.byName[name]
	return m, ok
}

// Methods returns every method in registration order.
func (r *Registry) Methods() []Method {
	out := make([]Method, len(r.order))
	for i, n := range r.order {
		out[i] = r.byName[n]
	}
	return out
}

// Owned returns the methods owned by one service, in registration order.
func (r *Registry) Owned(s Service) []Method {
	var out []Method
	for _, n := range r.order {
		if m := r.byName[n]; m.Service == s {
			out = append(out, m)
		}
	}
	return out
}
