// Package devices serves the device and firewall part of the Admin API:
// admin.vm.device.{pci,block}.* and admin.vm.device.denied.* over the devices the
// hypervisor reports (schemas/hostdev) and the assignments in the configuration, and
// admin.vm.firewall.* over each qube's rules (schemas/firewall), which live in the
// configuration's change log and are published for the netvms' agents in a key-value
// bucket laid out like qubesd's QubesDB /qubes-firewall/<ip>/ entries.
//
// One service owns both: device assignments and firewall rules are the two parts of
// a qube's configuration that are not properties, both answer for a qube's
// connections to the outside (hardware, network), and neither needs more than the
// configuration replica, the hypervisor and the events stream. Splitting them would
// double the plumbing for no independent scaling need.
package devices

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
	"github.com/qubesbus/qubesbus/schemas/hostdev"
	"github.com/qubesbus/qubesbus/schemas/lifecycle"
	"github.com/qubesbus/qubesbus/schemas/model"
	"github.com/qubesbus/qubesbus/schemas/replica"
)

// Lifecycle answers which qubes run (lifecycle.Client).
type Lifecycle interface {
	RuntimeSnapshot(ctx context.Context) (model.RuntimeSnapshot, error)
}

// Hypervisor is the host's device state (hostdev.Client).
type Hypervisor interface {
	Devices(ctx context.Context) (hostdev.Inventory, error)
	Attach(ctx context.Context, a hostdev.Attachment) error
	Detach(ctx context.Context, a hostdev.Attachment) error
}

// Store applies configuration changes (configstore.Client).
type Store interface {
	Apply(ctx context.Context, m config.Mutation) (uint64, error)
}

// Events publishes events and returns once they are stored (cloudevent.Publisher).
type Events interface {
	Publish(ctx context.Context, evs ...cloudevent.Event) error
}

// Config of the devices service.
type Config struct {
	Host     subject.Host
	Registry *rpc.Registry // nil: adminapi.Registry
	Log      *slog.Logger  // nil: discard
	Machine  model.Host    // zero: model.DefaultHost
	Auth     rpc.Authorizer
	// Lifecycle and Hypervisor default to the clients over Serve's connection.
	Lifecycle  Lifecycle
	Hypervisor Hypervisor
	// Replicas of the firewall and device-record buckets when this instance creates
	// them.
	Replicas int
	// Replica, if set, is a follower of the host's configuration that this process
	// already runs (one per host, shared by the services of `qubesbus run` and a
	// lab); nil follows one of its own.
	Replica *replica.Replica
	// WriteTimeout bounds a change waiting for persistence (default 30s).
	WriteTimeout time.Duration
	// Now is the clock of firewall expiry (nil: time.Now).
	Now func() time.Time
	// NoWatch turns the device watch off (watch.go): no device-added, device-removed
	// or automatic attachments on power events and hot-plugs. For hosts without a
	// hypervisor that reports devices.
	NoWatch bool
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
	if c.Replicas < 0 || c.Replicas > 5 {
		errs = append(errs, fmt.Errorf("replicas %d: want 1 to 5", c.Replicas))
	}
	return errors.Join(errs...)
}

// Service is the devices service of one host.
type Service struct {
	cfg Config
	log *slog.Logger
	// Set by Serve:
	rep     *replica.Replica
	store   Store
	events  Events
	life    Lifecycle
	hv      Hypervisor
	fw      *firewallTable
	records *records // the device watch's records (record.go)
	// afterTrigger, when set (by tests, before Serve), is told each input the watch
	// has handled, after its events are stored.
	afterTrigger func(kind, vm string)
	// watchStopped is closed once the device watch has stopped after ctx ended (at
	// once when it does not run): a process that stops waits for it before it closes
	// its connection, so that the inputs the watch took are handled.
	watchStopped chan struct{}

	// wmu serialises the changes of this instance (qubesd's single event loop);
	// several instances stay consistent through revision-checked mutations.
	wmu sync.Mutex
}

// Stopped is closed once the device watch has ended after Serve's ctx ended (at once
// if it never ran). A process that stops waits for it before it closes the service's
// connection, so that every input the watch took is handled to its end.
func (s *Service) Stopped() <-chan struct{} { return s.watchStopped }

// New checks the configuration; Serve starts the service.
func New(cfg Config) (*Service, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("devices config: %w", err)
	}
	if cfg.Registry == nil {
		cfg.Registry = adminapi.Registry
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Machine.MemoryMiB == 0 {
		cfg.Machine = model.DefaultHost
	}
	if cfg.WriteTimeout == 0 {
		cfg.WriteTimeout = 30 * time.Second
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Service{cfg: cfg, log: cfg.Log, watchStopped: make(chan struct{})}, nil
}

// Serve follows the host's configuration, opens the firewall bucket and starts the
// endpoints on nc. A Service serves once.
func (s *Service) Serve(ctx context.Context, nc *nats.Conn) (micro.Service, error) {
	if s.rep != nil {
		return nil, errors.New("devices: Serve called twice")
	}
	rep, err := replica.Shared(ctx, s.cfg.Replica, nc, s.cfg.Host, s.log)
	if err != nil {
		return nil, err
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, fmt.Errorf("jetstream: %w", err)
	}
	kv, err := OpenFirewallBucket(ctx, js, s.cfg.Replicas)
	if err != nil {
		return nil, err
	}
	recs, err := OpenDevicesBucket(ctx, js, s.cfg.Replicas)
	if err != nil {
		return nil, err
	}
	s.rep = rep
	s.store = configstore.Client{NC: nc, Host: s.cfg.Host, Caller: string(rpc.Devices), Local: s.cfg.LocalStore}
	s.events = s.cfg.Events
	if s.events == nil {
		s.events = cloudevent.NewPublisher(js, s.cfg.Host.ID())
	}
	s.life = s.cfg.Lifecycle
	if s.life == nil {
		s.life = lifecycle.Client{NC: nc, Host: s.cfg.Host}
	}
	s.hv = s.cfg.Hypervisor
	if s.hv == nil {
		s.hv = hostdev.Client{NC: nc, Host: s.cfg.Host}
	}
	s.fw = newFirewallTable(kv, s.cfg.Host, s.log)
	s.records = newRecords(recs, s.cfg.Host)
	mux := rpc.NewMux(s.cfg.Registry, rpc.Devices, rep, s.log)
	mux.Auth = s.cfg.Auth
	s.handlers(mux)
	svc, err := mux.Serve(ctx, nc, s.cfg.Host)
	if err != nil {
		return nil, err
	}
	if err := s.serveStartOps(nc, svc); err != nil {
		_ = svc.Stop()
		return nil, err
	}
	if err := nc.FlushTimeout(10 * time.Second); err != nil { // the server has the endpoints
		_ = svc.Stop()
		return nil, fmt.Errorf("flush: %w", err)
	}
	if s.cfg.NoWatch {
		close(s.watchStopped)
		s.log.Info("device watch off")
	} else if err := s.startWatch(ctx, nc, js); err != nil {
		close(s.watchStopped)
		_ = svc.Stop()
		return nil, fmt.Errorf("device watch: %w", err)
	}
	go s.expireLoop(ctx)
	return svc, nil
}

// handlers registers every method the service owns.
func (s *Service) handlers(mux *rpc.Mux) {
	mux.Handle("admin.vm.firewall.Get", s.firewallGet)
	mux.Handle("admin.vm.firewall.Set", s.firewallSet)
	mux.Handle("admin.vm.firewall.Reload", s.firewallReload)
	mux.Handle("admin.vm.device.denied.List", s.deniedList)
	mux.Handle("admin.vm.device.denied.Add", s.deniedAdd)
	mux.Handle("admin.vm.device.denied.Remove", s.deniedRemove)
	for _, class := range deviceClasses {
		p := "admin.vm.device." + class + "."
		mux.Handle(p+"Available", s.available(class))
		mux.Handle(p+"Assigned", s.assigned(class))
		mux.Handle(p+"Attached", s.attached(class))
		mux.Handle(p+"Assign", s.assign(class))
		mux.Handle(p+"Unassign", s.unassign(class))
		mux.Handle(p+"Attach", s.attach(class))
		mux.Handle(p+"Detach", s.detach(class))
		mux.Handle(p+"Set.assignment", s.setAssignment(class))
	}
}

// runtime is every qube's runtime now.
func (s *Service) runtime(ctx context.Context) (func(string) model.Runtime, error) {
	snap, err := s.life.RuntimeSnapshot(ctx)
	if err != nil {
		return nil, fmt.Errorf("%w: runtime values: %w", qerr.ErrAbort, err)
	}
	return func(name string) model.Runtime {
		if r, ok := snap.Values[name]; ok {
			return r
		}
		return model.Halted
	}, nil
}

// view runs f over a model of the current configuration.
func (s *Service) view(rt func(string) model.Runtime, f func(m *model.Model) error) error {
	var err error
	s.rep.ViewIndexed(func(c *config.Config, byName func(string) *config.Domain) {
		err = f(model.NewIndexed(c, s.cfg.Machine, rt, byName))
	})
	return err
}

// apply applies ops at the revision they were planned on and waits until this
// service's replica reflects them. The change is durable in the change log when it
// returns; with save, persistence writes qubes.xml after it, in the background
// (ChangesConfig), where qubesd saves before its reply.
func (s *Service) apply(ctx context.Context, rev uint64, ops []config.Op, save bool) error {
	newRev, err := s.store.Apply(ctx, config.Mutation{ExpectRevision: rev, Ops: ops, ChangesConfig: save})
	if err != nil {
		return fmt.Errorf("%w: apply: %w", qerr.ErrAbort, err)
	}
	if err := s.rep.WaitRevision(ctx, newRev); err != nil {
		return fmt.Errorf("%w: %w", qerr.ErrAbort, err)
	}
	return nil
}

// maxRetries bounds how often a change is planned again after another writer came
// first.
const maxRetries = 32

// change plans a change over the configuration (under the write lock) and applies it,
// planning again when another writer changed the configuration meanwhile. plan
// returns the ops (none: nothing to apply) and the events to publish after them; the
// pre-events it publishes itself through pre (at most once).
func (s *Service) change(ctx context.Context, save bool, plan func(m *model.Model, pre func(...cloudevent.Event) error) ([]config.Op, []cloudevent.Event, error)) error {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.WriteTimeout)
	defer cancel()
	s.wmu.Lock()
	defer s.wmu.Unlock()
	rt, err := s.runtime(ctx)
	if err != nil {
		return err
	}
	prePublished := false
	pre := func(evs ...cloudevent.Event) error {
		if prePublished {
			return nil
		}
		prePublished = true
		return s.publish(ctx, evs...)
	}
	for attempt := 0; ; attempt++ {
		rev := s.rep.Revision()
		var ops []config.Op
		var post []cloudevent.Event
		err := s.view(rt, func(m *model.Model) error {
			var err error
			ops, post, err = plan(m, pre)
			return err
		})
		if err != nil {
			return err
		}
		if len(ops) > 0 {
			err = s.apply(ctx, rev, ops, save)
			if errors.Is(err, config.ErrStaleRevision) && attempt < maxRetries {
				if werr := s.rep.WaitRevision(ctx, rev+1); werr != nil {
					return fmt.Errorf("%w: wait for config: %w", qerr.ErrAbort, werr)
				}
				continue
			}
			if err != nil {
				return err
			}
		}
		return s.publish(ctx, post...)
	}
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
