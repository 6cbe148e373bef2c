// Package replica is a service's local, indexed copy of a host's configuration,
// read from persistence. Reads are local; it resolves qube references for the checks.
package replica

import (
	"context"
	"errors"
	"fmt"
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
	// changed is signalled when rev grows.
	changed *sync.Cond
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

// Revision is the revision the replica reflects.
func (m *Replica) Revision() uint64 {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.rev
}

// View runs f with read access to the configuration; f must not keep or change it.
func (m *Replica) View(f func(c *config.Config)) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	f(m.conf)
}

// Apply applies an accepted change of revision rev. Changes arrive in revision order;
// one already reflected is ignored, and a gap is an error (the caller resynchronises
// from a snapshot).
func (m *Replica) Apply(rev uint64, ops []config.Op) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if rev <= m.rev {
		return nil
	}
	if rev != m.rev+1 {
		return fmt.Errorf("%w: have %d, got %d", ErrGap, m.rev, rev)
	}
	if err := config.Apply(m.conf, ops); err != nil {
		return fmt.Errorf("apply revision %d: %w", rev, err)
	}
	m.reset(m.conf, rev)
	m.cond().Broadcast()
	return nil
}

// Reset replaces the whole configuration (after a gap).
func (m *Replica) Reset(conf *config.Config, rev uint64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.reset(conf, rev)
	m.cond().Broadcast()
}

// ErrGap is returned by Apply for a change that does not follow the replica's revision.
var ErrGap = errors.New("replica: revision gap")

// WaitRevision blocks until the replica reflects rev (read-your-writes after a change).
func (m *Replica) WaitRevision(ctx context.Context, rev uint64) error {
	stop := context.AfterFunc(ctx, func() {
		m.mu.Lock()
		m.cond().Broadcast()
		m.mu.Unlock()
	})
	defer stop()
	m.mu.Lock()
	defer m.mu.Unlock()
	for m.rev < rev {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("wait for revision %d (have %d): %w", rev, m.rev, err)
		}
		m.cond().Wait()
	}
	return nil
}

// cond is created lazily; callers hold m.mu.
func (m *Replica) cond() *sync.Cond {
	if m.changed == nil {
		m.changed = sync.NewCond(&m.mu)
	}
	return m.changed
}
