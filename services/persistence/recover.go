package persistence

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/qubesbus/qubesbus/schemas/changelog"
	"github.com/qubesbus/qubesbus/schemas/indexed"
	"github.com/qubesbus/qubesbus/services/persistence/checkpoint"
)

// recover brings the state up to the end of the host's change log: from qubes.xml when
// its marker places it on the log's history, else from the log's base. A host without
// records starts its log with a base of qubes.xml as it is.
func (s *Store) recover(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for {
		last, err := s.clog.Last(ctx)
		if err != nil {
			return err
		}
		if last > 0 {
			break
		}
		if s.state == nil {
			return fmt.Errorf("%w: %s, no seed given, and the change log has no record of host %s",
				checkpoint.ErrMissing, s.disk.Path(), s.cfg.Host.ID())
		}
		seq, err := s.clog.Append(ctx, 0, changelog.Record{Revision: s.rev, Base: s.state.View()})
		if errors.Is(err, changelog.ErrConflict) {
			continue // another instance started the log meanwhile: follow it
		}
		if err != nil {
			return err
		}
		s.seq, s.baseRev = seq, s.rev
		// The marker names the base: it must not outlive it in a power cut.
		if s.cfg.SyncLog != nil {
			if err := s.cfg.SyncLog(ctx); err != nil {
				return fmt.Errorf("sync config change log: %w", err)
			}
		}
		if err := s.disk.Adopt(checkpoint.Mark{Revision: s.rev, Sequence: seq}); err != nil {
			return err
		}
		s.log.Info("started the config change log from qubes.xml", "revision", s.rev, "sequence", seq)
		return nil
	}

	mark := s.diskMark
	onHistory := false
	if s.state != nil && mark.Sequence > 0 {
		var err error
		if onHistory, err = s.clog.Holds(ctx, mark.Sequence, mark.Revision); err != nil {
			return err
		}
	}
	if !onHistory {
		switch {
		case s.state != nil && mark.Revision == 0:
			s.log.Info("qubes.xml has no revision marker and the change log has records for the host; using the log",
				"file", s.disk.Path())
		case s.state != nil:
			s.log.Warn("the revision qubes.xml holds is no longer in the change log (compacted, or a new log); rebuilding from the log",
				"file", s.disk.Path(), "revision", mark.Revision, "sequence", mark.Sequence)
		}
		s.state, s.rev, s.seq = nil, 0, 0
		s.written.Store(0)
	}
	from := s.rev
	if _, err := s.catchUpLocked(ctx); err != nil {
		return err
	}
	if s.state == nil {
		return fmt.Errorf("%w: no base record for host %s", ErrHistory, s.cfg.Host.ID())
	}
	if mark.Revision > s.rev {
		return fmt.Errorf("%w: %s holds revision %d but the change log of host %s ends at %d, "+
			"so acknowledged changes are missing from the log; remove %s.rev to accept the log's state",
			ErrHistory, s.disk.Path(), mark.Revision, s.cfg.Host.ID(), s.rev, s.disk.Path())
	}
	s.log.Info("configuration recovered", "revision", s.rev, "sequence", s.seq,
		"from_qubes_xml", onHistory, "replayed", s.rev-from)
	return nil
}

// catchUpLocked applies every record after s.seq, read from the stream leader, and
// says how many there were.
func (s *Store) catchUpLocked(ctx context.Context) (int, error) {
	for n := 0; ; n++ {
		rec, err := s.clog.Next(ctx, s.seq+1)
		if errors.Is(err, changelog.ErrEnd) {
			return n, nil
		}
		if err != nil {
			return n, err
		}
		if err := s.applyRecordLocked(rec); err != nil {
			return n, err
		}
	}
}

// applyRecordLocked applies a record appended by anyone (this instance before a
// restart, or another instance). Records are in log order; one already reflected is
// skipped.
func (s *Store) applyRecordLocked(rec changelog.Record) error {
	if rec.Sequence <= s.seq || rec.Known {
		return nil
	}
	switch {
	case rec.Base != nil:
		if s.state == nil || rec.Revision > s.rev {
			s.state, s.rev = indexed.New(rec.Base), rec.Revision
			s.unsaved = true
		}
		s.baseRev = max(s.baseRev, rec.Revision)
	case s.state == nil:
		return fmt.Errorf("%w: record %d (revision %d) before any base", ErrHistory, rec.Sequence, rec.Revision)
	case rec.Revision <= s.rev:
		// Reflected already (the base of a compaction repeats its revision).
	case rec.Revision != s.rev+1:
		return fmt.Errorf("%w: record %d has revision %d after %d", ErrHistory, rec.Sequence, rec.Revision, s.rev)
	default:
		if err := s.state.Apply(rec.Change.Ops); err != nil {
			return fmt.Errorf("%w: revision %d (record %d) does not apply: %w", ErrHistory, rec.Revision, rec.Sequence, err)
		}
		s.rev = rec.Revision
		if rec.Change.ChangesConfig {
			s.unsaved = true
		}
	}
	s.seq = rec.Sequence
	return nil
}

const tailCatchUpTimeout = 10 * time.Second

// onTail takes the records the log delivers while serving: those of other instances
// (a standby keeps its state current this way); its own it has already.
func (s *Store) onTail(rec changelog.Record, err error) {
	if err != nil {
		s.log.Error("config change log", "err", err)
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.applyRecordLocked(rec); err != nil {
		// Read from the leader instead: a missed record shows up there.
		ctx, cancel := context.WithTimeout(context.Background(), tailCatchUpTimeout)
		defer cancel()
		if _, cerr := s.catchUpLocked(ctx); cerr != nil {
			s.log.Error("apply config record", "sequence", rec.Sequence, "err", err, "catch_up", cerr)
		}
	}
}
