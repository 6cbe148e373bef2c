// Package storage serves the storage part of the Admin API: pools (admin.pool.*) and
// the volumes of qubes (admin.vm.volume.*), over pool drivers (driver.go).
//
// Where the state lives: a pool's configuration is a <pool> of qubes.xml and a qube's
// volume settings its <volume-config>, both changed through persistence's change log
// like every other change (config ops add-pool, set-pool, del-pool,
// set-volume-config); this service reads them from its replica. The data (images,
// revisions) is the pools': files under a file pool's dir_path, or a simulated pool's
// metadata in the QUBES_SIMPOOLS bucket (simstore.go: a watched cache, compare-and-set
// writes), shared by the host's instances. Clone tokens live in a JetStream KV
// bucket, so that CloneTo works whichever instance serves it.
//
// The volume side of qube operations is asked for over NATS (schemas/storage, in
// internal.go): properties has a new qube's volumes created before the qube is added
// (a failure fails admin.vm.Create* as in qubesd) and a removed qube's removed before
// admin.vm.Remove answers; vmlifecycle has a qube's volumes prepared before its domain
// is created (a failure is the start's error, and the volumes that call started are
// discarded). Stops follow the events stream: a durable consumer shared by the
// instances commits volumes on domain-shutdown. Simulated pools take faults from a
// lab (storageapi.LabOpFaults: pool full, slow clone, failing resize).
package storage

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"strings"
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
)

// Config of the storage service.
type Config struct {
	Host     subject.Host
	Registry *rpc.Registry // nil: adminapi.Registry
	Log      *slog.Logger  // nil: discard
	Auth     rpc.Authorizer
	// Root prefixes the absolute paths of file pools ("" or "/": the real filesystem).
	// `qubesbus run` maps them into its data dir.
	Root string
	// StatFS reports a filesystem's size and usage (nil: statvfs). A simulated host
	// reports fixed numbers.
	StatFS func(path string) (size, used int64, err error)
	// Stamp, if set, is the mtime of every image written (revision names carry it).
	Stamp *time.Time
	// NewToken makes clone tokens (nil: 32 random letters and digits).
	NewToken func() string
	// TokenTTL bounds how long a clone token stays valid (default 1 h).
	TokenTTL time.Duration
	// Replicas of the clone token bucket when this instance creates it.
	Replicas int
	// Replica, if set, is a follower of the host's configuration that this process
	// already runs (one per host, shared by the services of `qubesbus run` and a
	// lab); nil follows one of its own.
	Replica *replica.Replica
	// WriteTimeout bounds a write call (default 30 s).
	WriteTimeout time.Duration
	// Lifecycle answers power states (nil: lifecycle.Client on Serve's connection).
	Lifecycle PowerStates
	// Events stores the service's events (nil: QUBES_EVENTS over Serve's
	// connection); `qubesbus run` passes one that counts them for its metrics.
	Events Events
	// LocalStore, if set, is the host's persistence instance in this process, which
	// the service applies its changes through without NATS while it serves
	// (configstore.Local).
	LocalStore configstore.Local
}

// Events publishes events and returns once they are stored (cloudevent.Publisher).
type Events interface {
	Publish(ctx context.Context, evs ...cloudevent.Event) error
}

// PowerStates is what the service needs of the lifecycle: which qubes are not halted.
type PowerStates interface {
	PowerStates(ctx context.Context) (map[string]string, error)
}

// Validate reports every problem at once.
func (c Config) Validate() error {
	var errs []error
	if c.Host.ID() == "" {
		errs = append(errs, errors.New("no host"))
	}
	if c.Replicas < 0 || c.Replicas > 5 {
		errs = append(errs, fmt.Errorf("replicas %d: want 1 to 5", c.Replicas))
	}
	if c.TokenTTL < 0 {
		errs = append(errs, errors.New("negative token ttl"))
	}
	return errors.Join(errs...)
}

// Store applies configuration changes (configstore.Client).
type Store interface {
	Apply(ctx context.Context, m config.Mutation) (uint64, error)
}

// Service is the storage service of one host.
type Service struct {
	cfg    Config
	log    *slog.Logger
	host   Host
	rep    *replica.Replica
	store  Store
	events Events
	tokens jetstream.KeyValue
	life   PowerStates
	follow *powerFollower

	wmu sync.Mutex // serialises this instance's writes, as qubesd's event loop does

	pmu   sync.Mutex
	pools map[string]openPool // by name, opened from the configuration

	faults faultTable // of simulated pools, set by a lab
}

type openPool struct {
	key  string // the configuration it was opened from
	pool Pool
}

// New checks the configuration; Serve starts the service.
func New(cfg Config) (*Service, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("storage config: %w", err)
	}
	if cfg.Registry == nil {
		cfg.Registry = adminapi.Registry
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.NewToken == nil {
		cfg.NewToken = randomToken
	}
	if cfg.TokenTTL == 0 {
		cfg.TokenTTL = time.Hour
	}
	if cfg.WriteTimeout == 0 {
		cfg.WriteTimeout = 30 * time.Second
	}
	if cfg.Root == "/" {
		cfg.Root = ""
	}
	return &Service{cfg: cfg, log: cfg.Log, pools: map[string]openPool{},
		host: Host{Root: cfg.Root, StatFS: cfg.StatFS, Stamp: cfg.Stamp}}, nil
}

// Serve follows the configuration, opens the token bucket and the power-state
// consumer, and starts the endpoints on nc. A Service serves once.
func (s *Service) Serve(ctx context.Context, nc *nats.Conn) (micro.Service, error) {
	if s.rep != nil {
		return nil, errors.New("storage: Serve called twice")
	}
	rep, err := replica.Shared(ctx, s.cfg.Replica, nc, s.cfg.Host, s.log)
	if err != nil {
		return nil, err
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, fmt.Errorf("jetstream: %w", err)
	}
	if s.tokens, err = openTokens(ctx, js, s.cfg.Replicas, s.cfg.TokenTTL); err != nil {
		return nil, err
	}
	simKV, err := OpenSimBucket(ctx, js, s.cfg.Replicas, s.log)
	if err != nil {
		return nil, err
	}
	if s.host.sim, err = openSimStore(ctx, nc, simKV, s.cfg.Host.ID(), s.log); err != nil {
		return nil, err
	}
	s.rep = rep
	s.store = configstore.Client{NC: nc, Host: s.cfg.Host, Caller: string(rpc.Storage), Local: s.cfg.LocalStore}
	s.events = s.cfg.Events
	if s.events == nil {
		s.events = cloudevent.NewPublisher(js, s.cfg.Host.ID())
	}
	s.life = s.cfg.Lifecycle
	if s.life == nil {
		s.life = lifecycle.Client{NC: nc, Host: s.cfg.Host}
	}
	if s.follow, err = followPower(ctx, js, s); err != nil {
		return nil, err
	}
	mux := rpc.NewMux(s.cfg.Registry, rpc.Storage, rep, s.log)
	mux.Auth = s.cfg.Auth
	s.handlers(mux)
	svc, err := mux.Serve(ctx, nc, s.cfg.Host)
	if err != nil {
		return nil, err
	}
	if err := s.internalEndpoints(ctx, nc, svc); err != nil {
		_ = svc.Stop()
		return nil, err
	}
	if err := nc.FlushTimeout(10 * time.Second); err != nil {
		_ = svc.Stop()
		return nil, fmt.Errorf("flush: %w", err)
	}
	return svc, nil
}

func (s *Service) handlers(mux *rpc.Mux) {
	for name, h := range map[string]rpc.Handler{
		"admin.pool.List":                   s.poolList,
		"admin.pool.ListDrivers":            s.poolListDrivers,
		"admin.pool.Info":                   s.poolInfo,
		"admin.pool.UsageDetails":           s.poolUsageDetails,
		"admin.pool.volume.List":            s.poolVolumeList,
		"admin.pool.Add":                    s.poolAdd,
		"admin.pool.Remove":                 s.poolRemove,
		"admin.pool.Set.revisions_to_keep":  s.poolSetRevisions,
		"admin.pool.Set.ephemeral_volatile": s.poolSetEphemeral,

		"admin.vm.volume.List":                  s.volumeList,
		"admin.vm.volume.Info":                  s.volumeInfo,
		"admin.vm.volume.ListSnapshots":         s.volumeListSnapshots,
		"admin.vm.volume.Resize":                s.volumeResize,
		"admin.vm.volume.Revert":                s.volumeRevert,
		"admin.vm.volume.Clear":                 s.volumeClear,
		"admin.vm.volume.CloneFrom":             s.volumeCloneFrom,
		"admin.vm.volume.CloneTo":               s.volumeCloneTo,
		"admin.vm.volume.Set.revisions_to_keep": s.volumeSetRevisions,
		"admin.vm.volume.Set.rw":                s.volumeSetRW,
		"admin.vm.volume.Set.ephemeral":         s.volumeSetEphemeral,
	} {
		mux.Handle(name, h)
	}
}

// pool returns the open pool of a configuration entry, reopening it when its
// configuration changed.
func (s *Service) pool(pc config.Pool) (Pool, error) {
	key := fmt.Sprint(pc.Attrs)
	name := pc.Name()
	s.pmu.Lock()
	defer s.pmu.Unlock()
	if op, ok := s.pools[name]; ok && op.key == key {
		return op.pool, nil
	}
	drv, _ := pc.Attr("driver")
	d, ok := driverByName(drv)
	if !ok {
		return nil, fmt.Errorf("pool %s: unknown driver %q", name, drv)
	}
	cfg := make(PoolConfig, len(pc.Attrs))
	for i, a := range pc.Attrs {
		cfg[i] = KV{a.Name, a.Value}
	}
	p, err := d.Open(cfg, s.host)
	if err != nil {
		return nil, fmt.Errorf("pool %s: %w", name, err)
	}
	if sp, ok := p.(*simPool); ok {
		sp.faults = s.faultsOf(name)
	}
	s.pools[name] = openPool{key: key, pool: p}
	return p, nil
}

// apply applies ops at the revision they were planned on and waits until the
// replica has them; it returns ErrStale when another writer came first. The change is
// durable in the change log when it returns; persistence writes qubes.xml after it, in
// the background (ChangesConfig), where qubesd saves before its reply.
func (s *Service) apply(ctx context.Context, rev uint64, ops []config.Op) error {
	if len(ops) == 0 {
		return nil
	}
	newRev, err := s.store.Apply(ctx, config.Mutation{ExpectRevision: rev, Ops: ops, ChangesConfig: true})
	if err != nil {
		return fmt.Errorf("%w: apply: %w", qerr.ErrAbort, err)
	}
	if err := s.rep.WaitRevision(ctx, newRev); err != nil {
		return fmt.Errorf("%w: %w", qerr.ErrAbort, err)
	}
	return nil
}

// syncSim makes this instance's view of the simulated volumes as new as the bucket,
// before a call reads them: another instance may have served the change before.
// Hosts without a simulated pool skip the round trip.
func (s *Service) syncSim(ctx context.Context) error {
	simulated := false
	s.rep.View(func(c *config.Config) {
		for _, p := range c.Pools {
			drv, _ := p.Attr("driver")
			if d, ok := driverByName(drv); ok {
				if _, ok := d.(simDriver); ok {
					simulated = true
				}
			}
		}
	})
	if !simulated {
		return nil
	}
	if err := s.host.sim.Sync(ctx); err != nil {
		return fmt.Errorf("%w: %w", qerr.ErrAbort, err)
	}
	return nil
}

func (s *Service) publish(ctx context.Context, evs ...cloudevent.Event) error {
	if len(evs) == 0 {
		return nil
	}
	if err := s.events.Publish(ctx, evs...); err != nil {
		return fmt.Errorf("%w: %w", qerr.ErrAbort, err)
	}
	return nil
}

func lines(items []string) []byte {
	var b strings.Builder
	for _, it := range items {
		b.WriteString(it)
		b.WriteByte('\n')
	}
	return []byte(b.String())
}

const tokenChars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"

// randomToken is qubesd's random_string(32).
func randomToken() string {
	b := make([]byte, 32)
	for i := range b {
		n, err := rand.Int(rand.Reader, big.NewInt(int64(len(tokenChars))))
		if err != nil {
			panic(err) // crypto/rand does not fail on Linux
		}
		b[i] = tokenChars[n.Int64()]
	}
	return string(b)
}
