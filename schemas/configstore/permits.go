package configstore

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/qubesbus/qubesbus/bus/rpc"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/schemas/config"
)

// Operator is the caller name of people and tools that may apply any change (the
// admin role: `qubesbus` commands, tests). Services apply as their rpc.Service name.
const Operator = "admin"

// ErrNotPermitted wraps a mutation with an op its caller may not apply (Permits). It
// is refused whole, before anything is applied.
var ErrNotPermitted = errors.New("op not permitted to this caller")

// ApplySubject is the subject on which caller sends its mutations: the apply
// operation with the caller's name as its last token. On a server with the deploy
// roles (cmd/qubesbus/internal/access) each service may publish only on its own, so
// persistence knows who asks without trusting the message, and applies only what
// Permits lets that caller change: a service that is taken over cannot rewrite the
// parts of the configuration another owns.
func ApplySubject(h subject.Host, caller string) string {
	return h.Store(OpApply) + "." + caller
}

// CallerOf is the caller named by an apply subject, "" if subj is not one.
func CallerOf(subj string) string {
	i := strings.LastIndexByte(subj, '.')
	if i < 0 || !strings.HasSuffix(subj[:i], ".store."+OpApply) {
		return ""
	}
	return subj[i+1:]
}

// rule limits an op kind a service owns: to the properties named (names), or to the
// qubes qube accepts (what says which, for the refusal); nil limits nothing.
type rule struct {
	names []string
	qube  func(d *config.Domain) bool
	what  string
}

// autoCleanup accepts a disposable that is removed once it stops, as the lifecycle's
// inventory finds it (auto_cleanup is False unless set, and stored as qubesd writes it).
func autoCleanup(d *config.Domain) bool {
	v, _ := d.Property("auto_cleanup")
	return d.Class == "DispVM" && v == "True"
}

// owned lists, per service, the op kinds it may apply. Each service changes only what
// its own methods change in qubesd: properties everything of qubes, labels and the
// global properties but pools, volumes, devices and firewalls; storage the pools and
// volume configurations; devices the assignments, firewalls and devices_denied;
// backup the backup_timestamp it sets after a backup; the lifecycle the removal of a
// disposable that stopped.
var owned = map[string]map[config.OpKind]rule{
	string(rpc.Properties): {
		config.OpSetProperty: {}, config.OpDelProperty: {},
		config.OpSetGlobalProperty: {}, config.OpDelGlobalProperty: {},
		config.OpSetFeature: {}, config.OpDelFeature: {}, config.OpAddTag: {}, config.OpDelTag: {},
		config.OpAddDomain: {}, config.OpDelDomain: {}, config.OpAddLabel: {}, config.OpDelLabel: {},
	},
	string(rpc.Storage): {
		config.OpAddPool: {}, config.OpSetPool: {}, config.OpDelPool: {}, config.OpSetVolumeConfig: {},
	},
	string(rpc.Devices): {
		config.OpSetDevices: {}, config.OpSetFirewall: {},
		config.OpSetProperty: {names: []string{"devices_denied"}}, config.OpDelProperty: {names: []string{"devices_denied"}},
	},
	string(rpc.Backup): {
		config.OpSetProperty: {names: []string{"backup_timestamp"}},
	},
	string(rpc.VMLifecycle): {
		config.OpDelDomain: {qube: autoCleanup, what: "a DispVM with auto_cleanup"},
	},
}

// Permits reports whether caller may apply every op of ops, and if not which op it
// may not (wrapping ErrNotPermitted). view runs f over the qube of an id (nil if there
// is none), for the rules limited to some qubes. Operator may apply anything; a caller
// not in the table nothing.
func Permits(caller string, ops []config.Op, view func(domainID string, f func(d *config.Domain))) error {
	if caller == Operator {
		return nil
	}
	kinds, known := owned[caller]
	if !known {
		return fmt.Errorf("%w: %q is not a caller of the store", ErrNotPermitted, caller)
	}
	for i, op := range ops {
		r, ok := kinds[op.Kind]
		switch {
		case !ok:
			return fmt.Errorf("%w: op %d: %s may not %s", ErrNotPermitted, i, caller, op.Kind)
		case r.names != nil && !slices.Contains(r.names, op.Name):
			return fmt.Errorf("%w: op %d: %s may not %s %q", ErrNotPermitted, i, caller, op.Kind, op.Name)
		case r.qube != nil:
			ok := false
			if view != nil {
				view(op.Domain, func(d *config.Domain) { ok = d != nil && r.qube(d) })
			}
			if !ok {
				return fmt.Errorf("%w: op %d: %s may not %s %s: not %s", ErrNotPermitted, i, caller, op.Kind, op.Domain, r.what)
			}
		}
	}
	return nil
}
