package backup

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"

	"github.com/qubesbus/qubesbus/bus/cloudevent"
	"github.com/qubesbus/qubesbus/bus/qerr"
	"github.com/qubesbus/qubesbus/bus/rpc"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/schemas/adminapi"
	"github.com/qubesbus/qubesbus/schemas/config"
	"github.com/qubesbus/qubesbus/schemas/configstore"
	"github.com/qubesbus/qubesbus/schemas/lifecycle"
	"github.com/qubesbus/qubesbus/schemas/replica"
	storageapi "github.com/qubesbus/qubesbus/schemas/storage"
	"github.com/qubesbus/qubesbus/services/backup/archive"
)

// DefaultProfileDir is dom0's directory of backup profiles.
const DefaultProfileDir = "/etc/qubes/backup"

// PowerStates answers which qubes are not halted (lifecycle.Client).
type PowerStates interface {
	PowerStates(ctx context.Context) (map[string]string, error)
}

// VolumeData reads the committed data of qubes' volumes (storageapi.Client).
type VolumeData interface {
	ExportVolume(ctx context.Context, qube, volume string) (storageapi.ExportReply, error)
	ReadVolume(ctx context.Context, qube, volume string, p []byte, off int64) (int, error)
}

// Store applies configuration changes (configstore.Client).
type Store interface {
	Apply(ctx context.Context, m config.Mutation) (uint64, error)
	Flush(ctx context.Context, rev uint64) error
}

// Events publishes events and returns once they are stored (cloudevent.Publisher).
type Events interface {
	Publish(ctx context.Context, evs ...cloudevent.Event) error
}

// Config of the backup service.
type Config struct {
	Host     subject.Host
	Registry *rpc.Registry // nil: adminapi.Registry
	Log      *slog.Logger  // nil: discard
	Auth     rpc.Authorizer
	// ProfileDir holds the profiles, <id>.conf (default DefaultProfileDir).
	ProfileDir string
	// SinkDir stands for the qubes a backup may be sent to (destination_vm other than
	// dom0): <SinkDir>/<qube>/ is that qube's filesystem, where destination_path
	// leads. Empty: backups to a qube fail as a failing qubes.Backup call does.
	SinkDir string
	// TempDir holds encrypted parts until they are written ("": os.TempDir).
	TempDir string
	// Scrypt is the key derivation cost of every part (zero:
	// archive.DefaultScryptParams); tests lower it.
	Scrypt archive.ScryptParams
	// ChunkSize splits inner files into parts (0: archive.DefaultChunkSize, 100 MiB
	// as qubesd).
	ChunkSize int64
	// ProgressInterval is the least time between two backup-progress events (0: 1 s,
	// qubesd's rate).
	ProgressInterval time.Duration
	// WriteTimeout bounds the writes of backup timestamps (default 30 s).
	WriteTimeout time.Duration
	// Now is the clock of backup ids, file names and timestamps (nil: time.Now).
	Now func() time.Time
	// Lifecycle and Volumes default to the clients over Serve's connection.
	Lifecycle PowerStates
	Volumes   VolumeData
	// Replica, if set, is the process's follower of the host's configuration
	// (shared by the services of `qubesbus run`); nil follows one of its own.
	Replica *replica.Replica
	// Events stores the service's events (nil: QUBES_EVENTS over Serve's
	// connection); `qubesbus run` passes one that counts them for its metrics.
	Events Events
	// LocalStore, if set, is the host's persistence instance in this process, which
	// the service applies its changes through without NATS while it serves
	// (configstore.Local).
	LocalStore configstore.Local
}

// Validate reports every problem at once.
func (c Config) Validate() error {
	var errs []error
	if c.Host.ID() == "" {
		errs = append(errs, errors.New("no host"))
	}
	if c.ChunkSize < 0 {
		errs = append(errs, errors.New("negative chunk size"))
	}
	if c.ProgressInterval < 0 {
		errs = append(errs, errors.New("negative progress interval"))
	}
	return errors.Join(errs...)
}

// Service is the backup service of one host. It runs one backup at a time: the
// table of the running one is this instance's, so a host runs one instance (a second
// would run backups of its own and not see this one's to cancel).
type Service struct {
	cfg Config
	log *slog.Logger
	// Set by Serve:
	served context.Context // Serve's: when it ends, a running backup is cancelled
	rep    *replica.Replica
	store  Store
	events Events
	life   PowerStates
	vols   VolumeData

	mu      sync.Mutex
	running *run // the backup in progress, nil when none
}

// run is a backup in progress.
type run struct {
	profile string
	cancel  context.CancelFunc
}

// New checks the configuration; Serve starts the service.
func New(cfg Config) (*Service, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("backup config: %w", err)
	}
	if cfg.Registry == nil {
		cfg.Registry = adminapi.Registry
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.ProfileDir == "" {
		cfg.ProfileDir = DefaultProfileDir
	}
	if cfg.ProgressInterval == 0 {
		cfg.ProgressInterval = time.Second
	}
	if cfg.WriteTimeout == 0 {
		cfg.WriteTimeout = 30 * time.Second
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Service{cfg: cfg, log: cfg.Log}, nil
}

// Serve follows the host's configuration and starts the endpoints on nc. A Service
// serves once.
func (s *Service) Serve(ctx context.Context, nc *nats.Conn) (micro.Service, error) {
	if s.rep != nil {
		return nil, errors.New("backup: Serve called twice")
	}
	rep, err := replica.Shared(ctx, s.cfg.Replica, nc, s.cfg.Host, s.log)
	if err != nil {
		return nil, err
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, fmt.Errorf("jetstream: %w", err)
	}
	s.rep = rep
	s.served = ctx
	s.store = configstore.Client{NC: nc, Host: s.cfg.Host, Caller: string(rpc.Backup), Local: s.cfg.LocalStore}
	s.events = s.cfg.Events
	if s.events == nil {
		s.events = cloudevent.NewPublisher(js, s.cfg.Host.ID())
	}
	s.life = s.cfg.Lifecycle
	if s.life == nil {
		s.life = lifecycle.Client{NC: nc, Host: s.cfg.Host}
	}
	s.vols = s.cfg.Volumes
	if s.vols == nil {
		s.vols = storageapi.Client{NC: nc, Host: s.cfg.Host}
	}
	mux := rpc.NewMux(s.cfg.Registry, rpc.Backup, rep, s.log)
	mux.Auth = s.cfg.Auth
	mux.Handle("admin.backup.Info", s.info)
	mux.Handle("admin.backup.Execute", s.execute)
	mux.Handle("admin.backup.Cancel", s.cancel)
	return mux.Serve(ctx, nc, s.cfg.Host)
}

// wireError is a profile error as qubesd raises it.
func wireError(err error) error {
	var pe *ProfileError
	switch {
	case errors.Is(err, ErrProfileID):
		return qerr.ProtocolError(err.Error())
	case errors.As(err, &pe) && errors.Is(err, ErrProfileNotFound):
		return qerr.BackupProfileNotFoundError(pe.Msg)
	case errors.As(err, &pe):
		return qerr.QubesException(pe.Msg)
	}
	return fmt.Errorf("%w: %w", qerr.ErrAbort, err)
}

// load is qubesd's _load_backup_profile: the profile, its destination, its
// passphrase (unless skipped), and the plan of what it backs up, announced with a
// backup-get-files event on each qube that has files in it.
func (s *Service) load(ctx context.Context, id string, withPassphrase bool) (*job, error) {
	p, err := LoadProfile(s.cfg.ProfileDir, id)
	if err != nil {
		return nil, wireError(err)
	}
	j := &job{profile: p}
	s.rep.ViewIndexedAt(func(rev uint64, c *config.Config, _ func(string) *config.Domain) {
		j.conf, j.rev = c.Clone(), rev
	})
	if j.destVM, err = p.CheckDestination(j.conf); err != nil {
		return nil, wireError(err)
	}
	if withPassphrase {
		pass, err := p.Passphrase(j.conf)
		if err != nil {
			return nil, wireError(err)
		}
		j.passphrase = []byte(pass)
	}
	selected, others := p.Select(j.conf)
	j.others = others
	usage := map[[2]string]int64{}
	for _, d := range selected {
		if QID(d) == 0 {
			continue
		}
		for _, v := range Volumes(d) {
			if v.SaveOnStop != "True" {
				continue
			}
			rep, err := s.vols.ExportVolume(ctx, d.Name(), v.Name)
			if err != nil {
				return nil, fmt.Errorf("%w: %w", qerr.ErrAbort, err)
			}
			usage[[2]string{d.Name(), v.Name}] = rep.Usage
		}
	}
	j.plan = Plan(selected, func(d *config.Domain, v Volume) int64 { return usage[[2]string{d.Name(), v.Name}] })
	var evs []cloudevent.Event
	for _, e := range j.plan {
		if QID(e.Domain) != 0 {
			evs = append(evs, cloudevent.New(e.Domain.Name(), "backup-get-files"))
		}
	}
	if err := s.publish(ctx, evs...); err != nil {
		return nil, err
	}
	return j, nil
}

func (s *Service) publish(ctx context.Context, evs ...cloudevent.Event) error {
	if len(evs) == 0 {
		return nil
	}
	if err := s.events.Publish(ctx, evs...); err != nil {
		return fmt.Errorf("%w: publish events: %w", qerr.ErrAbort, err)
	}
	return nil
}

// running reports the power state of every qube that is not halted.
func (s *Service) powerStates(ctx context.Context) (Running, error) {
	states, err := s.life.PowerStates(ctx)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", qerr.ErrAbort, err)
	}
	return func(name string) bool {
		st, ok := states[name]
		return ok && st != "Halted"
	}, nil
}

// info is admin.backup.Info: the summary of what the profile would back up.
func (s *Service) info(ctx context.Context, c *rpc.Call) ([]byte, error) {
	j, err := s.load(ctx, c.Arg, false)
	if err != nil {
		return nil, err
	}
	running, err := s.powerStates(ctx)
	if err != nil {
		return nil, err
	}
	return []byte(Summary(j.plan, j.others, running)), nil
}

// execute is admin.backup.Execute: it writes the backup and answers when it is
// complete, BackupCancelledError after a Cancel.
func (s *Service) execute(ctx context.Context, c *rpc.Call) ([]byte, error) {
	j, err := s.load(ctx, c.Arg, true)
	if err != nil {
		return nil, err
	}
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	// A service stopping (the process exits) cancels the backup too, so that no
	// partial archive stays behind.
	defer context.AfterFunc(s.served, cancel)()
	s.mu.Lock()
	if s.running != nil {
		s.mu.Unlock()
		return nil, qerr.BackupAlreadyRunningError("Backup already running")
	}
	s.running = &run{profile: c.Arg, cancel: cancel}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.running = nil
		s.mu.Unlock()
	}()
	log := s.log.With("profile", c.Arg, "id", c.ID)
	log.Info("backup started", "qubes", len(j.plan))
	err = s.write(runCtx, j)
	if err != nil && runCtx.Err() != nil && ctx.Err() == nil {
		log.Info("backup cancelled")
		return nil, qerr.BackupCancelledError("Backup cancelled")
	}
	if err != nil {
		log.Warn("backup failed", "err", err)
		return nil, err
	}
	log.Info("backup written", "path", j.target)
	if err := s.stamp(ctx, j); err != nil {
		return nil, err
	}
	return nil, nil
}

// cancel is admin.backup.Cancel: it stops the running backup of the profile at once
// and answers without waiting for it to end, as qubesd.
func (s *Service) cancel(_ context.Context, c *rpc.Call) ([]byte, error) {
	if err := CheckID(c.Arg); err != nil {
		return nil, wireError(err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.running == nil || s.running.profile != c.Arg {
		return nil, qerr.QubesException("Backup operation not running")
	}
	s.running.cancel()
	return nil, nil
}
