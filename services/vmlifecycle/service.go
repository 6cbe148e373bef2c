// Package vmlifecycle owns the power state of qubes and serves the Admin API power
// methods over a hypervisor Driver: the power-state machine, qubesd's event sequences
// and errors, chained netvm starts, disposable cleanup, and vm-stats production.
//
// Runtime state lives in the driver only (never in qubes.xml); the service keeps just
// per-qube locks and which domain instance's stop it has yet to announce, and rebuilds
// that from the driver when it starts.
package vmlifecycle

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/cloudevent"
	"github.com/qubesbus/qubesbus/bus/envelope"
	"github.com/qubesbus/qubesbus/bus/rpc"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/schemas/adminapi"
	"github.com/qubesbus/qubesbus/schemas/config"
	"github.com/qubesbus/qubesbus/schemas/configstore"
	"github.com/qubesbus/qubesbus/schemas/lifecycle"
	"github.com/qubesbus/qubesbus/schemas/replica"
)

// ConfigStore applies configuration mutations (configstore.Client); the lifecycle
// uses it only to remove disposables with auto_cleanup after they stop.
type ConfigStore interface {
	Apply(ctx context.Context, m config.Mutation) (uint64, error)
}

// Config of the lifecycle service.
type Config struct {
	Host     subject.Host
	Registry *rpc.Registry // nil: adminapi.Registry
	// Replica is the configuration replica: it resolves qubes for the pre-handler
	// checks and, unless Inventory is set, provides the qubes' effective values. Nil:
	// Serve follows the change log on its connection; successive lease terms share one.
	Replica   *replica.Replica
	Inventory Inventory
	// Events stores the lifecycle's events; nil: QUBES_EVENTS over Serve's connection
	// (cloudevent.Publisher).
	Events Publisher
	Driver Driver
	Log    *slog.Logger // nil: discard
	// StatsLease is how long an admin.vm.Stats watcher keeps vm-stats flowing without
	// renewing (default 10 s).
	StatsLease time.Duration
	// Auth decides which source may call what; nil allows every call.
	Auth rpc.Authorizer
	// Epoch orders this instance's runtime marks after every earlier instance's: the
	// lease term's epoch when instances are elected (bus/lease); zero: the start time.
	Epoch uint64
	// Volumes prepares a qube's volumes before its start (storageapi.Client); nil: no
	// storage service (the lifecycle's own tests), volumes are not prepared.
	Volumes Volumes
	// Devices checks and attaches a qube's required devices as it starts
	// (devicectl.Client); nil: no devices service (the lifecycle's own tests).
	Devices Devices
}

// Validate reports every missing part at once.
func (c Config) Validate() error {
	var errs []error
	if c.Driver == nil {
		errs = append(errs, errors.New("no hypervisor driver"))
	}
	if c.Host.ID() == "" {
		errs = append(errs, errors.New("no host"))
	}
	return errors.Join(errs...)
}

// Service is the lifecycle service of one host.
type Service struct {
	cfg  Config
	host subject.Host
	// Set by Serve:
	model *replica.Replica
	inv   Inventory
	drv   Driver
	pub   Publisher
	store ConfigStore
	log   *slog.Logger
	stats *statsProducer

	mu     sync.Mutex
	qubes  map[string]*qubeRun
	queues map[string]*noticeQueue
	held   holds // locks other services hold (hold.go)

	// Runtime marks, for the properties service's runtime cache (RuntimeSnapshot):
	// version counts changes, busy the operations under way.
	epoch   uint64
	version atomic.Uint64
	busy    atomic.Int64
	notify  atomic.Pointer[nats.Conn] // publishes change notices once Serve runs
}

// qubeRun is the service's bookkeeping of one qube.
type qubeRun struct {
	lock chan struct{} // holding the token is holding the per-qube lock
	// Guarded by Service.mu:
	xid     int           // domain instance whose stop is not announced yet; -1 none
	stopped chan struct{} // closed once that stop has been announced
}

// New returns the service; Serve starts it.
func New(cfg Config) (*Service, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("vmlifecycle config: %w", err)
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Registry == nil {
		cfg.Registry = adminapi.Registry
	}
	if cfg.StatsLease <= 0 {
		cfg.StatsLease = 10 * time.Second
	}
	s := &Service{cfg: cfg, host: cfg.Host, drv: cfg.Driver, log: cfg.Log,
		qubes: map[string]*qubeRun{}, queues: map[string]*noticeQueue{}, held: holds{by: map[string]func(uint64){}},
		epoch: cfg.Epoch}
	if s.epoch == 0 {
		s.epoch = uint64(time.Now().UnixNano())
	}
	s.version.Store(1)
	s.stats = newStatsProducer(s, cfg.StatsLease)
	return s, nil
}

// Serve reads the running domains back from the driver, follows its notices, and
// starts the Admin API endpoints and the internal ones (states, runtime, stats-lease)
// on nc. The service runs until ctx ends (then stop the returned micro service too).
func (s *Service) Serve(ctx context.Context, nc *nats.Conn) (micro.Service, error) {
	if s.model != nil {
		return nil, errors.New("vmlifecycle: Serve called twice")
	}
	rep, err := replica.Shared(ctx, s.cfg.Replica, nc, s.host, s.log)
	if err != nil {
		return nil, err
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, fmt.Errorf("jetstream: %w", err)
	}
	s.model, s.inv = rep, s.cfg.Inventory
	if s.inv == nil {
		s.inv = ReplicaInventory{R: rep}
	}
	s.pub = s.cfg.Events
	if s.pub == nil {
		s.pub = cloudevent.NewPublisher(js, s.host.ID())
	}
	s.store = configstore.Client{NC: nc, Host: s.host, Caller: string(rpc.VMLifecycle)}
	mux := rpc.NewMux(s.cfg.Registry, rpc.VMLifecycle, rep, s.log)
	mux.Auth = s.cfg.Auth
	mux.RuntimeMark = s.Mark
	for name, h := range map[string]rpc.Handler{
		"admin.vm.Start":        s.vmStart,
		"admin.vm.Shutdown":     s.vmShutdown,
		"admin.vm.Kill":         s.vmKill,
		"admin.vm.Pause":        s.vmPause,
		"admin.vm.Unpause":      s.vmUnpause,
		"admin.vm.Suspend":      s.vmSuspend,
		"admin.vm.Resume":       s.vmResume,
		"admin.vm.CurrentState": s.vmCurrentState,
		"admin.vm.Console":      s.vmConsole,
		"admin.vm.Stats":        s.stats.vmStats,
	} {
		mux.Handle(name, h)
	}
	// Watch before reading the domains, so a stop between the two is not missed.
	notices, err := s.drv.Watch(ctx)
	if err != nil {
		return nil, fmt.Errorf("watch hypervisor: %w", err)
	}
	if err := s.adopt(ctx); err != nil {
		return nil, err
	}
	go s.follow(ctx, notices)

	s.notify.Store(nc)
	svc, err := mux.Serve(ctx, nc, s.host)
	if err != nil {
		return nil, err
	}
	endpoints := []struct {
		name, subj string
		h          micro.HandlerFunc
	}{
		{lifecycle.OpStates, s.host.Service(lifecycle.ServiceToken, lifecycle.OpStates), s.serveStates(ctx)},
		{lifecycle.OpRuntime, s.host.Service(lifecycle.ServiceToken, lifecycle.OpRuntime), s.serveRuntime(ctx)},
		{lifecycle.OpStatsLease, s.host.Service(lifecycle.ServiceToken, lifecycle.OpStatsLease), s.stats.serveLease},
		{lifecycle.OpHold, s.host.Service(lifecycle.ServiceToken, lifecycle.OpHold), s.serveHold(ctx)},
		{lifecycle.OpRelease, s.host.Service(lifecycle.ServiceToken, lifecycle.OpRelease), s.serveRelease},
	}
	for _, e := range endpoints {
		// The handlers answer from goroutines of their own: they get detached requests.
		h := e.h
		detached := micro.HandlerFunc(func(r micro.Request) { h(bus.Detach(nc, r)) })
		if err := svc.AddEndpoint(e.name, detached, micro.WithEndpointSubject(e.subj)); err != nil {
			_ = svc.Stop()
			return nil, fmt.Errorf("add %s endpoint: %w", e.name, err)
		}
	}
	if err := nc.FlushTimeout(10 * time.Second); err != nil {
		_ = svc.Stop()
		return nil, fmt.Errorf("flush: %w", err)
	}
	go s.stats.run(ctx, nc)
	return svc, nil
}

// adopt records the domains that are already active (after a restart of the service).
func (s *Service) adopt(ctx context.Context) error {
	doms, err := s.drv.Domains(ctx)
	if err != nil {
		return fmt.Errorf("read domains from the hypervisor: %w", err)
	}
	for _, d := range doms {
		if d.XID == 0 {
			continue
		}
		r := s.run(d.Name)
		s.mu.Lock()
		r.xid = d.XID
		s.mu.Unlock()
	}
	return nil
}

func (s *Service) run(name string) *qubeRun {
	s.mu.Lock()
	defer s.mu.Unlock()
	r := s.qubes[name]
	if r == nil {
		r = &qubeRun{lock: make(chan struct{}, 1), xid: -1, stopped: make(chan struct{})}
		s.qubes[name] = r
	}
	return r
}

// lock takes the per-qube lock. Operations on one qube are serialized; a start that
// brings up the netvm chain holds the qube's lock while it takes its netvm's, always
// downstream before upstream, which is a consistent order because the network has no
// loops.
func (s *Service) lock(ctx context.Context, name string) (unlock func(), err error) {
	r := s.run(name)
	select {
	case r.lock <- struct{}{}:
		s.begin()
		return func() { s.end(); <-r.lock }, nil
	case <-ctx.Done():
		return nil, fmt.Errorf("lock %s: %w", name, ctx.Err())
	}
}

// Runtime is what a qube's runtime properties show and its power state.
type Runtime = lifecycle.Runtime

// HaltedRuntime is the runtime of a qube that is not in a Runtimes answer.
var HaltedRuntime = lifecycle.HaltedRuntime

// Runtimes returns the runtime of every qube that is not Halted: active domains,
// dom0 and RemoteVMs (always Running).
func (s *Service) Runtimes(ctx context.Context) (map[string]Runtime, error) {
	doms, err := s.drv.Domains(ctx)
	if err != nil {
		return nil, fmt.Errorf("read domains: %w", err)
	}
	// Only what runs is asked about, so the cost follows running domains, not qubes.
	out := map[string]Runtime{"dom0": {PowerState: Running, XID: 0, StubdomXID: -1}}
	for _, name := range s.inv.Remotes() {
		out[name] = Runtime{PowerState: Running, XID: -1, StubdomXID: -1}
	}
	for i := range doms {
		d := &doms[i]
		q, ok := s.inv.Qube(d.Name)
		switch {
		case !ok || q.IsRemote():
		case q.IsAdminVM():
			rt := out[q.Name]
			rt.MemoryKiB, rt.MaxMemKiB = d.MemoryKiB, d.MaxMemKiB
			out[q.Name] = rt
		default:
			out[q.Name] = Runtime{PowerState: powerOf(d, q.Qrexec), XID: d.XID, StubdomXID: d.StubdomXID,
				StartTime: startTimeText(d.StartTime), MemoryKiB: d.MemoryKiB, MaxMemKiB: d.MaxMemKiB}
		}
	}
	return out, nil
}

// PowerStates returns the power state of every qube that is not Halted.
func (s *Service) PowerStates(ctx context.Context) (map[string]string, error) {
	rts, err := s.Runtimes(ctx)
	if err != nil {
		return nil, err
	}
	out := make(map[string]string, len(rts))
	for k, v := range rts {
		out[k] = string(v.PowerState)
	}
	return out, nil
}

// startTimeText renders a start time as qubesd's start_time: the hypervisor keeps it
// with two decimals and Python prints the float in its shortest form.
func startTimeText(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	cs := t.UnixNano() / 1e7 // centiseconds
	f := float64(cs) / 100
	txt := strconv.FormatFloat(f, 'f', -1, 64)
	if cs%100 == 0 {
		txt += ".0"
	}
	return txt
}

func (s *Service) serveStates(ctx context.Context) micro.HandlerFunc {
	return func(r micro.Request) {
		go func() {
			st, err := s.PowerStates(ctx)
			if err != nil {
				_ = r.Error("500", err.Error(), nil)
				return
			}
			_ = r.RespondJSON(st)
		}()
	}
}

func (s *Service) serveRuntime(ctx context.Context) micro.HandlerFunc {
	return func(r micro.Request) {
		go func() {
			snap, err := s.Snapshot(ctx)
			if err != nil {
				_ = r.Error("500", err.Error(), nil)
				return
			}
			body, err := json.Marshal(snap.Runtimes)
			if err != nil {
				_ = r.Error("500", err.Error(), nil)
				return
			}
			h := nats.Header{}
			envelope.Marks{ConfigRev: snap.ConfigRev, Runtime: snap.Mark}.Set(h)
			h.Set(lifecycle.HeaderSettled, strconv.FormatBool(snap.Settled))
			_ = r.Respond(body, micro.WithHeaders(micro.Headers(h)))
		}()
	}
}

// emit publishes events in order. A failure is logged and returned; callers that have
// already changed the hypervisor carry on (the change happened), callers before any
// change give up.
func (s *Service) emit(ctx context.Context, evs ...cloudevent.Event) error {
	if len(evs) == 0 {
		return nil
	}
	// Long enough to wait out a stream leader election after a node loss.
	pctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	if err := s.pub.Publish(pctx, evs...); err != nil {
		s.log.Error("publish events", "vm", evs[0].VM, "event", evs[0].Name, "err", err)
		return err
	}
	return nil
}
