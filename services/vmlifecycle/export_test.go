package vmlifecycle

import "context"

// Start starts a qube as admin.vm.Start does, under a context the test controls (a
// call over NATS cannot be cancelled on the service's side).
func (s *Service) Start(ctx context.Context, name string) error { return s.start(ctx, name, nil) }

// Watchers is the number of open stats leases.
func (s *Service) Watchers() int { return s.stats.watchers() }
