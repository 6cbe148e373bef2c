package vmlifecycle

import (
	"context"
	"time"
)

// Start starts a qube as admin.vm.Start does, under a context the test controls (a
// call over NATS cannot be cancelled on the service's side).
func (s *Service) Start(ctx context.Context, name string) error { return s.start(ctx, name, nil) }

// Watchers is the number of open stats leases.
func (s *Service) Watchers() int {
	p := s.stats
	p.mu.Lock()
	defer p.mu.Unlock()
	p.prune(time.Now())
	return len(p.leases)
}

// Locked reports whether something (an operation, a hold) has the qube's lock.
func (s *Service) Locked(name string) bool { return len(s.run(name).lock) == 1 }
