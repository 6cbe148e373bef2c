package vmlifecycle

import (
	"context"

	"github.com/qubesbus/qubesbus/bus/envelope"
	"github.com/qubesbus/qubesbus/schemas/lifecycle"
)

// Runtime marks let the properties service cache runtime snapshots (see
// properties.runtimeCache). Every operation on a qube runs under its lock, and so does
// the handling of every hypervisor notice; taking a lock begins a change and releasing
// it ends one. Both bump the version and publish a change notice, and the version is
// also stamped on every reply, so a caller that saw a reply can never be served a
// snapshot from before it.

// Mark is the service's current runtime mark.
func (s *Service) Mark() envelope.RuntimeMark {
	return envelope.RuntimeMark{Epoch: s.epoch, Version: s.version.Load()}
}

// begin marks an operation under way: busy first, so that a snapshot taken while the
// hypervisor changes is never settled.
func (s *Service) begin() {
	s.busy.Add(1)
	s.changed()
}

// end marks an operation done: the version first, so that a snapshot that sees the
// operation gone also sees the version move.
func (s *Service) end() {
	s.changed()
	s.busy.Add(-1)
}

func (s *Service) changed() {
	v := s.version.Add(1)
	if nc := s.notify.Load(); nc != nil {
		mark := envelope.RuntimeMark{Epoch: s.epoch, Version: v}
		// Best effort: a lost notice is bounded by the cache's maximum age.
		_ = nc.Publish(s.host.Service(lifecycle.ServiceToken, lifecycle.SubjectChanged), []byte(mark.String()))
	}
}

// Snapshot is RuntimeSnapshot's answer, as the lifecycle service takes it.
type Snapshot struct {
	Runtimes  map[string]Runtime
	Mark      envelope.RuntimeMark
	ConfigRev uint64
	Settled   bool
}

// Snapshot returns the runtime of every qube that is not halted, marked with the
// version it reflects at least and whether any change was under way meanwhile.
func (s *Service) Snapshot(ctx context.Context) (Snapshot, error) {
	busy := s.busy.Load()
	mark := s.Mark()
	rev := s.model.Revision()
	rts, err := s.Runtimes(ctx)
	if err != nil {
		return Snapshot{}, err
	}
	settled := busy == 0 && s.busy.Load() == 0 && s.version.Load() == mark.Version
	return Snapshot{Runtimes: rts, Mark: mark, ConfigRev: rev, Settled: settled}, nil
}
