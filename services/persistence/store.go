package persistence

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/schemas/changelog"
	"github.com/qubesbus/qubesbus/schemas/config"
	"github.com/qubesbus/qubesbus/schemas/configstore"
	"github.com/qubesbus/qubesbus/schemas/indexed"
	"github.com/qubesbus/qubesbus/services/persistence/checkpoint"
)

// Config of the persistence service.
type Config struct {
	Host    subject.Host
	DataDir string // holds qubes.xml, qubes.xml.rev and qubes.xml.lock
	// SeedXML is copied to DataDir/qubes.xml when that does not exist yet; the seed
	// itself is never modified. Without a seed and a qubes.xml, the configuration comes
	// from the change log (a standby instance with an empty data dir).
	SeedXML string
	// Replicas of the QUBES_CONFIG stream when this instance creates it: 1 (default)
	// on one server, 3 in a cluster.
	Replicas int
	// CompactEvery: after this many revisions since the last base record a new base is
	// appended and the host's older records are purged. 0 means 10 000; negative, never.
	CompactEvery int
	// ApplyTimeout bounds one store.apply call served over NATS; 0 means 30 s.
	ApplyTimeout time.Duration
	// SyncLog makes every record the change log has acknowledged so far survive a
	// power cut (embedded.StreamSyncer of QUBES_CONFIG, when the NATS server runs in
	// this process). Apply acknowledges a change only after a SyncLog that started
	// after its append; concurrent changes share one (group commit). nil: the log is
	// as durable as the NATS server makes it (replicas 3, or sync_interval: always).
	SyncLog func(ctx context.Context) error
	Log     *slog.Logger // nil: discard
}

// Validate reports every problem at once.
func (c Config) Validate() error {
	var errs []error
	if c.DataDir == "" {
		errs = append(errs, errors.New("no data dir"))
	}
	if c.Replicas < 0 || c.Replicas > 5 {
		errs = append(errs, fmt.Errorf("replicas %d: want 1 to 5", c.Replicas))
	}
	if c.ApplyTimeout < 0 {
		errs = append(errs, errors.New("negative apply timeout"))
	}
	return errors.Join(errs...)
}

func (c Config) compactEvery() uint64 {
	switch {
	case c.CompactEvery < 0:
		return 0
	case c.CompactEvery == 0:
		return 10_000
	}
	return uint64(c.CompactEvery)
}

// Change is one accepted mutation as the change log carries it.
type Change = changelog.Change

// Snapshot is the whole configuration at one revision.
type Snapshot = configstore.Snapshot

// Errors of Apply besides config's (config.ErrStaleRevision, config.ErrDuplicate, …).
var (
	// ErrNotServing: Apply before Serve or after Close; there is no change log.
	ErrNotServing  = configstore.ErrNotServing
	ErrUnavailable = configstore.ErrUnavailable
	ErrNotSaved    = configstore.ErrNotSaved
	// ErrHistory: the change log holds records that do not form one history.
	ErrHistory = errors.New("config change log is inconsistent")
)

// maxConflicts bounds how often one Apply re-decides after losing a race with another
// instance before giving up.
const maxConflicts = 32

// Store is the persistence service of one host. See the package comment.
type Store struct {
	cfg  Config
	log  *slog.Logger
	disk checkpoint.File

	mu       sync.RWMutex
	state    *indexed.Config // nil while no configuration is known (empty data dir)
	rev      uint64          // revision of state
	seq      uint64          // change-log sequence of rev's record
	baseRev  uint64          // revision of the host's latest base record
	diskMark checkpoint.Mark // what qubes.xml held at Open
	clog     *changelog.Log  // nil until Serve
	// unsaved is set when records read from the log (not appended here) ought to be in
	// qubes.xml: changes with ChangesConfig, or a base that replaced the state. Serve
	// writes after recovery if so; records of other instances wait for the next write.
	unsaved bool

	flush   flusher       // qubes.xml writes
	durable groupSync     // SyncLog calls
	saveNow chan struct{} // wakes saveLoop: a change wants qubes.xml written
	written atomic.Uint64 // revision qubes.xml holds, as far as this instance knows
	synced  atomic.Uint64 // revision the change log holds durably
	// announce, once serving with SyncLog, publishes each synced revision
	// (configstore.SyncedWatch), so writers need not ask store.sync per change.
	announce atomic.Pointer[nats.Conn]
	syncs    atomic.Uint64
	writes   atomic.Uint64
	appends  atomic.Uint64
	lost     atomic.Uint64 // appends lost to another instance (conflicts)
	refused  atomic.Uint64 // mutations with an op not the caller's (permits)

	serveMu  sync.Mutex
	cancel   context.CancelFunc // ends the serving context; set once Serve started
	closed   bool
	svc      micro.Service
	stopTail func()
	// handlers counts apply and flush calls in progress; hmu orders their Add before
	// stopServing's Wait (draining).
	hmu      sync.Mutex
	draining bool
	handlers sync.WaitGroup
}

// New loads the host's qubes.xml, seeding it first if needed. It does not touch NATS:
// Serve brings the configuration up to date from the change log.
func New(cfg Config) (*Store, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("persistence config: %w", err)
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	log := cfg.Log
	if err := os.MkdirAll(cfg.DataDir, 0o770); err != nil {
		return nil, fmt.Errorf("data dir: %w", err)
	}
	s := &Store{cfg: cfg, log: log, disk: checkpoint.New(filepath.Join(cfg.DataDir, "qubes.xml")),
		saveNow: make(chan struct{}, 1)}
	s.flush.write = s.writeCheckpoint
	s.durable.sync = s.syncLog
	s.durable.rev = s.Revision
	conf, mark, err := s.disk.Load(cfg.SeedXML)
	switch {
	case errors.Is(err, checkpoint.ErrMissing):
		log.Info("no local qubes.xml; the configuration will come from the change log", "file", s.disk.Path())
	case err != nil:
		return nil, err
	default:
		s.state = indexed.New(conf)
		s.diskMark = mark
		s.rev = max(mark.Revision, 1)
		s.seq = mark.Sequence
		s.written.Store(s.rev)
	}
	return s, nil
}

// view is the configuration and its revision (a zero Snapshot while none is known),
// without a deep copy: the parts it shares are never written again.
func (s *Store) view() Snapshot {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.state == nil {
		return Snapshot{}
	}
	return Snapshot{Revision: s.rev, Sequence: s.seq, Config: s.state.View()}
}

// Revision is the revision the store holds.
func (s *Store) Revision() uint64 {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.rev
}

// Metrics are the store's counters (store.metrics and the micro stats of each endpoint).
type Metrics = configstore.Metrics

// Metrics returns the counters.
func (s *Store) Metrics() Metrics {
	s.mu.RLock()
	rev, seq := s.rev, s.seq
	s.mu.RUnlock()
	return Metrics{Revision: rev, Sequence: seq, Written: s.written.Load(), Writes: s.writes.Load(),
		Appends: s.appends.Load(), Conflicts: s.lost.Load(), Synced: s.synced.Load(), Syncs: s.syncs.Load(),
		Refused: s.refused.Load()}
}

// Apply applies a mutation atomically and returns its revision. The change is durable
// in the change log before Apply returns (with m.DeferSync, only once SyncThrough its
// revision returns; a sync starts right away all the same, so that it may be done by
// then). With m.ChangesConfig, qubes.xml is written after that, in the background, in
// one write shared by the changes made meanwhile (saveLoop).
func (s *Store) Apply(ctx context.Context, m config.Mutation) (uint64, error) {
	rev, err := s.append(ctx, m)
	if err != nil {
		return 0, err
	}
	if m.ChangesConfig {
		defer s.saveSoon()
	}
	if m.DeferSync {
		s.durable.start()
		return rev, nil
	}
	if err := s.SyncThrough(ctx, rev); err != nil {
		return rev, err
	}
	return rev, nil
}

// SyncThrough returns once revision rev (which this instance holds) is durable in the
// change log: after the running sync if it started once rev was in the log, else after
// the next one, which callers arriving meanwhile share (group commit).
func (s *Store) SyncThrough(ctx context.Context, rev uint64) error {
	if s.synced.Load() >= rev {
		return nil
	}
	if err := s.durable.wait(ctx, rev); err != nil {
		return fmt.Errorf("%w: change log sync for revision %d: %w", ErrNotSaved, rev, err)
	}
	return nil
}

// syncTimeout bounds one SyncLog call: a disk that stops answering fails the changes
// waiting for it instead of holding them forever.
const syncTimeout = 30 * time.Second

// syncLog makes the records through revision rev durable (every append up to rev was
// acknowledged when rev was read: s.mu is held across each) and notes it. Only the
// durable groupSync calls it, one call at a time.
func (s *Store) syncLog(rev uint64) error {
	if s.cfg.SyncLog != nil && rev > s.synced.Load() {
		ctx, cancel := context.WithTimeout(context.Background(), syncTimeout)
		defer cancel()
		if err := s.cfg.SyncLog(ctx); err != nil {
			return err
		}
		s.syncs.Add(1)
	}
	if rev > s.synced.Load() {
		s.synced.Store(rev)
		// Only an instance that syncs the log itself speaks for its durability: one
		// without SyncLog beside one with it must not announce its appends early.
		if nc := s.announce.Load(); nc != nil && s.cfg.SyncLog != nil {
			if err := configstore.PublishSynced(nc, s.cfg.Host, rev); err != nil {
				s.log.Debug("announce synced revision", "revision", rev, "err", err)
			}
		}
	}
	return nil
}

// saveSoon asks saveLoop to write qubes.xml.
func (s *Store) saveSoon() {
	select {
	case s.saveNow <- struct{}{}:
	default: // already asked: the coming write takes this change too
	}
}

// savePauseFactor and maxSavePause set the pause after a background write of
// qubes.xml: nine times as long as the write took, at most maxSavePause. Writes then
// take at most a tenth of the time under a stream of changes while they take under
// half a second. Measured at 9999 qubes (a 12 MB file, about 350 ms a write on a busy
// machine), the change log's group-commit fsync took twice as long as at 1009 when
// the writer paused three times as long: both fsync on the same disk.
const (
	savePauseFactor = 9
	maxSavePause    = 5 * time.Second
)

// saveLoop writes qubes.xml after changes that ask for it, off their reply path, until
// ctx ends (Close then writes the last revision). After each write it pauses
// (savePauseFactor); changes made meanwhile share the next write.
func (s *Store) saveLoop(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.saveNow:
		}
		start := time.Now()
		if err := s.flush.wait(ctx); err != nil && ctx.Err() == nil {
			s.log.Error("save qubes.xml", "file", s.disk.Path(), "err", err)
		}
		pause := time.NewTimer(min(savePauseFactor*time.Since(start), maxSavePause))
		select {
		case <-ctx.Done():
			pause.Stop()
			return
		case <-pause.C:
		}
	}
}

// append validates m against the state and appends it to the change log, on the
// condition that no other instance appended since this one's last known record. Losing
// that race, it reads what it missed and decides again (a mutation valid before may
// now be stale or invalid). The lock is held throughout, so changes are serial here,
// and the condition makes them serial across instances.
func (s *Store) append(ctx context.Context, m config.Mutation) (uint64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.clog == nil || s.state == nil {
		return 0, ErrNotServing
	}
	current := false // the state included every record of the log during this call
	catchUp := func() (int, error) {
		n, err := s.catchUpLocked(ctx)
		if err != nil {
			return n, fmt.Errorf("%w: %w", ErrUnavailable, err)
		}
		current = true
		return n, nil
	}
	for conflicts := 0; ; conflicts++ {
		if m.ExpectRevision > s.rev { // another instance may be ahead: look before refusing
			if _, err := catchUp(); err != nil {
				return 0, err
			}
		}
		if m.ExpectRevision != 0 && m.ExpectRevision != s.rev {
			return 0, fmt.Errorf("%w: expected %d, at %d", config.ErrStaleRevision, m.ExpectRevision, s.rev)
		}
		undo, err := s.state.Try(m.Ops)
		if err != nil {
			// Refuse only on the latest state: a caller who just removed a qube
			// through another instance may now create one with its name.
			if current || conflicts == maxConflicts {
				return 0, err
			}
			if n, cerr := catchUp(); cerr != nil || n == 0 {
				return 0, errors.Join(err, cerr)
			}
			continue
		}
		rev := s.rev + 1
		seq, err := s.clog.Append(ctx, s.seq, changelog.Record{Revision: rev,
			Change: &changelog.Change{Revision: rev, Ops: m.Ops, ChangesConfig: m.ChangesConfig}})
		if err == nil {
			s.rev, s.seq = rev, seq
			s.appends.Add(1)
			s.compactLocked(ctx)
			return rev, nil
		}
		undo()
		if !errors.Is(err, changelog.ErrConflict) || conflicts == maxConflicts {
			return 0, fmt.Errorf("%w: %w", ErrUnavailable, err)
		}
		s.lost.Add(1)
		if _, err := catchUp(); err != nil {
			return 0, err
		}
	}
}

// compactLocked appends a base of the current state once enough revisions followed the
// last one, then purges the host's older records: the log stays bounded, and an
// instance without a usable qubes.xml starts from the base. A failure only delays it.
func (s *Store) compactLocked(ctx context.Context) {
	every := s.cfg.compactEvery()
	if every == 0 || s.rev-s.baseRev < every {
		return
	}
	seq, err := s.clog.Append(ctx, s.seq, changelog.Record{Revision: s.rev, Base: s.state.View()})
	if err != nil {
		s.log.Warn("append config base", "revision", s.rev, "err", err)
		return
	}
	s.seq, s.baseRev = seq, s.rev
	if err := s.clog.Compact(ctx, seq); err != nil {
		s.log.Warn("compact config log", "err", err)
		return
	}
	s.log.Info("compacted config change log", "revision", s.rev, "base", seq)
}

// writeCheckpoint writes qubes.xml if it does not hold the current revision. Only the
// flusher calls it, one call at a time.
func (s *Store) writeCheckpoint() error {
	s.mu.Lock()
	if s.state == nil {
		s.mu.Unlock()
		return nil
	}
	// Encoding runs outside the lock on a view, so changes go on meanwhile.
	v, rev, seq := s.state.View(), s.rev, s.seq
	s.unsaved = false
	s.mu.Unlock()
	if rev == s.written.Load() {
		return nil
	}
	// qubes.xml never runs ahead of the durable log: after a power cut, a file at a
	// revision the log lost would stop the start (recover).
	if err := s.SyncThrough(context.Background(), rev); err != nil {
		s.mu.Lock()
		s.unsaved = true
		s.mu.Unlock()
		return err
	}
	res, err := s.disk.Write(v, checkpoint.Mark{Revision: rev, Sequence: seq})
	if err != nil {
		s.mu.Lock()
		s.unsaved = true
		s.mu.Unlock()
		return fmt.Errorf("save %s: %w", s.disk.Path(), err)
	}
	if res.Foreign {
		s.log.Warn("qubes.xml had been changed outside qubesbus; that change is overwritten", "file", s.disk.Path())
	}
	if res.Written {
		s.writes.Add(1)
	}
	s.written.Store(rev)
	return nil
}

// Close stops serving, waits for calls in progress (until ctx ends) and writes
// qubes.xml if it does not hold the last revision. The store cannot serve again.
func (s *Store) Close(ctx context.Context) error {
	err := s.stopServing(ctx)
	return errors.Join(err, s.flush.wait(ctx))
}
