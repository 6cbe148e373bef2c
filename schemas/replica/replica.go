// Package replica is a service's local, indexed copy of a host's configuration, read
// from persistence (a snapshot, then the change log: Follow). Reads are
// local; it resolves qube references for the checks. A change costs what it touches
// (package indexed), not the number of qubes.
package replica

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"

	"github.com/qubesbus/qubesbus/bus/qerr"
	"github.com/qubesbus/qubesbus/bus/rpc"
	"github.com/qubesbus/qubesbus/schemas/config"
	"github.com/qubesbus/qubesbus/schemas/indexed"
)

// AdminVMUUID is dom0's fixed UUID.
const AdminVMUUID = "00000000-0000-0000-0000-000000000000"

// Replica is the in-memory configuration of one host with its lookup indexes.
type Replica struct {
	mu  sync.RWMutex
	rev uint64
	// pub is rev for Revision, which takes no lock: called inside a view (holding
	// the read lock), a second read lock would deadlock once a writer waits.
	pub atomic.Uint64
	x   *indexed.Config
	// changed is signalled when rev grows.
	changed *sync.Cond
	// waiters counts WaitRevision calls still waiting; lag is nudged when one starts
	// (the follower's catchUp listens).
	waiters int
	lag     chan struct{}
}

// New indexes a configuration; the replica owns conf from now on.
func New(conf *config.Config, rev uint64) *Replica {
	r := &Replica{x: indexed.New(conf), rev: rev, lag: make(chan struct{}, 1)}
	r.pub.Store(rev)
	return r
}

func domainUUID(d *config.Domain) string {
	if d.Class == "AdminVM" {
		return AdminVMUUID
	}
	u, _ := d.Property("uuid")
	return u
}

func refOf(d *config.Domain) rpc.Ref {
	// Tags share the replica's slice: configs are replaced on change, never modified.
	return rpc.Ref{Name: d.Name(), Class: d.Class, UUID: domainUUID(d), Tags: d.Tags}
}

// ResolveName implements rpc.Resolver.
func (m *Replica) ResolveName(_ context.Context, name string) (rpc.Ref, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	d, ok := m.x.ByName(name)
	if !ok {
		return rpc.Ref{}, qerr.ErrVMNotFound
	}
	return refOf(d), nil
}

// ResolveUUID implements rpc.Resolver. dom0 has a fixed UUID whatever it stores.
func (m *Replica) ResolveUUID(_ context.Context, uuid string) (rpc.Ref, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if uuid == AdminVMUUID {
		for i := range m.x.Config().Domains { // dom0 comes first in qubes.xml order
			if d := &m.x.Config().Domains[i]; d.Class == "AdminVM" {
				return refOf(d), nil
			}
		}
		return rpc.Ref{}, qerr.ErrVMNotFound
	}
	d, ok := m.x.ByUUID(uuid)
	if !ok || d.Class == "AdminVM" {
		return rpc.Ref{}, qerr.ErrVMNotFound
	}
	return refOf(d), nil
}

// Labels returns the labels by index.
func (m *Replica) Labels() []config.Label {
	m.mu.RLock()
	defer m.mu.RUnlock()
	out := append([]config.Label(nil), m.x.Config().Labels...)
	sort.Slice(out, func(i, j int) bool { return out[i].Index < out[j].Index })
	return out
}

// Revision is the revision the replica reflects.
func (m *Replica) Revision() uint64 { return m.pub.Load() }

// View runs f with read access to the configuration; f must not keep or change it.
func (m *Replica) View(f func(c *config.Config)) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	f(m.x.Config())
}

// ViewIndexed is View with the replica's name index: byName finds a qube in constant
// time, so a read of one qube does not cost more with more qubes.
func (m *Replica) ViewIndexed(f func(c *config.Config, byName func(string) *config.Domain)) {
	m.ViewIndexedAt(func(_ uint64, c *config.Config, byName func(string) *config.Domain) { f(c, byName) })
}

// ViewIndexedAt is ViewIndexed that also gives the revision the configuration is at.
func (m *Replica) ViewIndexedAt(f func(rev uint64, c *config.Config, byName func(string) *config.Domain)) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	f(m.rev, m.x.Config(), m.byName)
}

func (m *Replica) byName(name string) *config.Domain {
	d, _ := m.x.ByName(name)
	return d
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
	// Incremental: a change costs what it touches, not the number of qubes.
	if err := m.x.Apply(ops); err != nil {
		return fmt.Errorf("apply revision %d: %w", rev, err)
	}
	m.rev = rev
	m.pub.Store(rev)
	m.cond().Broadcast()
	return nil
}

// Reset replaces the whole configuration (after a gap); the replica owns conf.
func (m *Replica) Reset(conf *config.Config, rev uint64) {
	x := indexed.New(conf) // indexing 1000 qubes takes a while: not under the lock
	m.mu.Lock()
	defer m.mu.Unlock()
	m.x, m.rev = x, rev
	m.pub.Store(rev)
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
	if m.rev >= rev {
		return nil
	}
	m.waiters++
	defer func() { m.waiters-- }()
	select {
	case m.lag <- struct{}{}:
	default:
	}
	for m.rev < rev {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("wait for revision %d (have %d): %w", rev, m.rev, err)
		}
		m.cond().Wait()
	}
	return nil
}

// lagging is nudged whenever a caller starts waiting for a revision the replica lacks.
func (m *Replica) lagging() <-chan struct{} { return m.lag }

// hasWaiters reports whether a caller still waits for a revision.
func (m *Replica) hasWaiters() bool {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.waiters > 0
}

// cond is created lazily; callers hold m.mu.
func (m *Replica) cond() *sync.Cond {
	if m.changed == nil {
		m.changed = sync.NewCond(&m.mu)
	}
	return m.changed
}
