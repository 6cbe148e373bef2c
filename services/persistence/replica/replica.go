// Package replica is a service's local, indexed copy of a host's configuration,
// read from persistence. Reads are local; it resolves qube references for the checks.
package replica

import (
	"context"
	"sort"
	"sync"

	"github.com/qubesbus/qubesbus/bus/qerr"
	"github.com/qubesbus/qubesbus/bus/rpc"
	"github.com/qubesbus/qubesbus/schemas/config"
)

// AdminVMUUID is dom0's fixed UUID.
const AdminVMUUID = "00000000-0000-0000-0000-000000000000"

// Replica is the in-memory configuration of one host with its lookup indexes.
type Replica struct {
	mu     sync.RWMutex
	rev    uint64
	conf   *config.Config
	byName map[string]int // index into conf.Domains
	byUUID map[string]int
}

// New indexes a configuration.
func New(conf *config.Config, rev uint64) *Replica {
	m := &Replica{}
	m.reset(conf, rev)
	return m
}

func (m *Replica) reset(conf *config.Config, rev uint64) {
	m.conf, m.rev = conf, rev
	m.byName = make(map[string]int, len(conf.Domains))
	m.byUUID = make(map[string]int, len(conf.Domains))
	for i := range conf.Domains {
		d := &conf.Domains[i]
		m.byName[d.Name()] = i
		m.byUUID[domainUUID(d)] = i
	}
}

func domainUUID(d *config.Domain) string {
	if d.Class == "AdminVM" {
		return AdminVMUUID
	}
	u, _ := d.Property("uuid")
	return u
}

func refOf(d *config.Domain) rpc.Ref {
	return rpc.Ref{Name: d.Name(), Class: d.Class, UUID: domainUUID(d)}
}

// ResolveName implements rpc.Resolver.
func (m *Replica) ResolveName(_ context.Context, name string) (rpc.Ref, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	i, ok := m.byName[name]
	if !ok {
		return rpc.Ref{}, qerr.ErrVMNotFound
	}
	return refOf(&m.conf.Domains[i]), nil
}

// ResolveUUID implements rpc.Resolver.
func (m *Replica) ResolveUUID(_ context.Context, uuid string) (rpc.Ref, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	i, ok := m.byUUID[uuid]
	if !ok {
		return rpc.Ref{}, qerr.ErrVMNotFound
	}
	return refOf(&m.conf.Domains[i]), nil
}

// Refs returns every qube in admin.vm.List order: dom0 first, then by name (bytes).
func (m *Replica) Refs() []rpc.Ref {
	m.mu.RLock()
	out := make([]rpc.Ref, 0, len(m.conf.Domains))
	for i := range m.conf.Domains {
		out = append(out, refOf(&m.conf.Domains[i]))
	}
	m.mu.RUnlock()
	sort.Slice(out, func(i, j int) bool {
		if a, b := out[i].IsAdminVM(), out[j].IsAdminVM(); a != b {
			return a
		}
		return out[i].Name < out[j].Name
	})
	return out
}

// Labels returns the labels by index.
func (m *Replica) Labels() []config.Label {
	m.mu.RLock()
	defer m.mu.RUnlock()
	out := append([]config.Label(nil), m.conf.Labels...)
	sort.Slice(out, func(i, j int) bool { return out[i].Index < out[j].Index })
	return out
}
