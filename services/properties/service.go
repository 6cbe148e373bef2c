// Package properties serves the configuration part of the Admin API: properties,
// features, tags, labels, notes, qube creation and removal, and the lists. The rules
// live in the pure package model; this package reads them over a replica of the
// host's configuration, sends changes to persistence and publishes the events.
package properties

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/qubesbus/qubesbus/schemas/adminapi"
	"github.com/qubesbus/qubesbus/schemas/configstore"
	"github.com/qubesbus/qubesbus/schemas/lifecycle"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"

	"github.com/qubesbus/qubesbus/bus/cloudevent"
	"github.com/qubesbus/qubesbus/bus/envelope"
	"github.com/qubesbus/qubesbus/bus/qerr"
	"github.com/qubesbus/qubesbus/bus/rpc"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/schemas/config"
	"github.com/qubesbus/qubesbus/schemas/device"
	"github.com/qubesbus/qubesbus/schemas/model"
	"github.com/qubesbus/qubesbus/schemas/replica"
)

// VMClasses in qubesd's registry order (admin.vmclass.List).
var VMClasses = model.VMClasses

// DeviceClasses in the order the recorded qubesd lists them (admin.deviceclass.List).
var DeviceClasses = device.Classes

// Lifecycle is what the service needs of the lifecycle service (lifecycle.Client):
// runtime snapshots, which it caches (runtimeCache), and holds on a qube's lifecycle
// lock. Hold keeps the lock (no power operation on the qube starts) until release is
// called with the revision of the change made meanwhile; after is the runtime mark
// once the lock was taken.
type Lifecycle interface {
	RuntimeSnapshot(ctx context.Context) (model.RuntimeSnapshot, error)
	Hold(ctx context.Context, name string) (after envelope.RuntimeMark, release func(rev uint64), err error)
}

// Store applies configuration changes (configstore.Client).
type Store interface {
	Apply(ctx context.Context, m config.Mutation) (uint64, error)
	// Sync returns once every change up to revision rev is durable (after an Apply
	// with DeferSync).
	Sync(ctx context.Context, rev uint64) error
}

// watchedStore is configstore.Client with Sync through a SyncedWatch.
type watchedStore struct {
	configstore.Client
	synced *configstore.SyncedWatch
}

func (w watchedStore) Sync(ctx context.Context, rev uint64) error { return w.synced.Sync(ctx, rev) }

// Volumes is what the service needs of the storage service (storageapi.Client): the
// volumes of a new qube made before it is added (a failure fails the create, as in
// qubesd), and those of a removed qube removed before the reply.
type Volumes interface {
	CreateVolumes(ctx context.Context, qube, volumeConfig string, rev uint64) error
	RemoveVolumes(ctx context.Context, qube, volumeConfig string, rev uint64) error
}

// Events stores the service's events (cloudevent.Publisher,
// metrics.CountingPublisher). Publish returns once they are stored; Send sends them
// now and returns what waits for them to be stored: a change's post-events are sent
// under the write lock, in the order of the changes, and their acks awaited after it,
// so the next change need not wait for them.
type Events interface {
	Publish(ctx context.Context, evs ...cloudevent.Event) error
	Send(ctx context.Context, evs ...cloudevent.Event) (wait func(context.Context) error)
}

// Config of the properties service.
type Config struct {
	Host     subject.Host
	Registry *rpc.Registry // nil: adminapi.Registry
	Log      *slog.Logger  // nil: discard
	Machine  model.Host    // zero: model.DefaultHost
	// Replicas of the notes bucket when this instance creates it (OpenNotes).
	Replicas int
	// Replica, if set, is a follower of the host's configuration that this process
	// already runs (one per host, shared by the services of `qubesbus run` and a
	// lab); nil follows one of its own.
	Replica *replica.Replica
	// Lifecycle answers runtime questions; nil: the lifecycle service over Serve's
	// connection (lifecycle.Client).
	Lifecycle Lifecycle
	// Events publishes the events of changes; nil: QUBES_EVENTS over Serve's
	// connection (cloudevent.Publisher).
	Events Events
	// Volumes makes and removes the volumes of created and removed qubes; nil: no
	// storage service (qubes are created and removed in the configuration only).
	Volumes Volumes
	// WriteTimeout bounds a write call waiting for persistence (default 30s).
	WriteTimeout time.Duration
	// Auth decides which source may call what; nil allows every call (qubesd itself
	// leaves that to qrexec policy).
	Auth rpc.Authorizer
	// RuntimeMaxAge bounds how long a cached runtime snapshot is served without a
	// change notice (default 1s); see runtimeCache.
	RuntimeMaxAge time.Duration
	// Local, if set, lets the gateway of this process call the service's reads
	// without NATS (rpc.Local).
	Local *rpc.Local
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

// Service is the properties service of one host.
type Service struct {
	cfg Config
	log *slog.Logger
	// Set by Serve:
	rep    *replica.Replica
	life   Lifecycle
	store  Store
	events Events
	notes  *notes
	rtc    *runtimeCache
	// replies keeps the GetAll and List replies of the current revision and runtime.
	replies replyCache
	// serving ends when the service stops (Serve's context), and its read-aheads of
	// GetAll replies with it; aheadDone, for tests, hears each read-ahead end with the
	// number of replies it computed.
	serving   context.Context
	aheadDone func(computed int)

	// wmu serialises the changes of this instance, as qubesd's single event loop does;
	// several instances are kept consistent by revision-checked mutations. keys
	// serialises whole write calls on one key (commit).
	wmu  sync.Mutex
	keys keyLocks

	lmu sync.Mutex
	// newLabels are labels created by this instance: qubesd keeps their colour as
	// bytes until it restarts, so admin.label.Get of them fails.
	newLabels map[string]bool
}

// New checks the configuration; Serve starts the service.
func New(cfg Config) (*Service, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("properties config: %w", err)
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
	if cfg.RuntimeMaxAge == 0 {
		cfg.RuntimeMaxAge = time.Second
	}
	return &Service{cfg: cfg, log: cfg.Log, newLabels: map[string]bool{}}, nil
}

// handlers are the methods this service answers, besides the ones missing from the
// registry (Mux.HandleUnknown).
func (s *Service) handlers(mux *rpc.Mux) {
	for name, h := range map[string]rpc.Handler{
		"admin.vm.List":          s.vmList,
		"admin.vmclass.List":     s.vmclassList,
		"admin.deviceclass.List": s.deviceclassList,

		"admin.vm.property.List":       s.propertyList,
		"admin.vm.property.Get":        s.propertyGet,
		"admin.vm.property.GetAll":     s.propertyGetAll,
		"admin.vm.property.GetDefault": s.propertyGetDefault,
		"admin.vm.property.Help":       s.propertyHelp,
		"admin.vm.property.Set":        s.propertySet,
		"admin.vm.property.Reset":      s.propertyReset,
		"admin.property.List":          s.propertyList,
		"admin.property.Get":           s.propertyGet,
		"admin.property.GetAll":        s.propertyGetAll,
		"admin.property.GetDefault":    s.propertyGetDefault,
		"admin.property.Help":          s.propertyHelp,
		"admin.property.Set":           s.propertySet,
		"admin.property.Reset":         s.propertyReset,

		"admin.vm.feature.List":                        s.featureList,
		"admin.vm.feature.Get":                         s.featureCheck(false, false, false),
		"admin.vm.feature.CheckWithTemplate":           s.featureCheck(true, false, false),
		"admin.vm.feature.CheckWithNetvm":              s.featureCheck(false, true, false),
		"admin.vm.feature.CheckWithAdminVM":            s.featureCheck(false, false, true),
		"admin.vm.feature.CheckWithTemplateAndAdminVM": s.featureCheck(true, false, true),
		"admin.vm.feature.Set":                         s.featureSet,
		"admin.vm.feature.Remove":                      s.featureRemove,

		"admin.vm.tag.List":   s.tagList,
		"admin.vm.tag.Get":    s.tagGet,
		"admin.vm.tag.Set":    s.tagSet,
		"admin.vm.tag.Remove": s.tagRemove,

		"admin.label.List":   s.labelList,
		"admin.label.Get":    s.labelGet,
		"admin.label.Index":  s.labelIndex,
		"admin.label.Create": s.labelCreate,
		"admin.label.Remove": s.labelRemove,

		"admin.vm.notes.Get": s.notesGet,
		"admin.vm.notes.Set": s.notesSet,

		"admin.vm.CreateDisposable": s.createDisposable,
		"admin.vm.Remove":           s.remove,
	} {
		mux.Handle(name, h)
	}
	for _, class := range model.VMClasses {
		mux.Handle("admin.vm.Create."+class, s.create(class, false))
		mux.Handle("admin.vm.CreateInPool."+class, s.create(class, true))
	}
}

// Replica is the service's configuration replica (nil until Serve).
func (s *Service) Replica() *replica.Replica { return s.rep }

// Serve follows the host's configuration, opens the notes bucket and starts the
// service's endpoints on nc, until ctx ends or the micro service is stopped. A Service
// serves once.
func (s *Service) Serve(ctx context.Context, nc *nats.Conn) (micro.Service, error) {
	if s.rep != nil {
		return nil, errors.New("properties: Serve called twice")
	}
	rep, err := replica.Shared(ctx, s.cfg.Replica, nc, s.cfg.Host, s.log)
	if err != nil {
		return nil, err
	}
	s.serving = ctx
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, fmt.Errorf("jetstream: %w", err)
	}
	kv, err := openNotesBucket(ctx, js, s.cfg.Replicas, s.log)
	if err != nil {
		return nil, err
	}
	s.rep, s.notes = rep, newNotes(kv, s.cfg.Host)
	client := configstore.Client{NC: nc, Host: s.cfg.Host, Caller: string(rpc.Properties), Local: s.cfg.LocalStore}
	// Durability of a change is learnt from persistence's notice of the sync that
	// covered it, not asked for per change (store.sync).
	synced, err := configstore.WatchSynced(client)
	if err != nil {
		return nil, err
	}
	context.AfterFunc(ctx, func() { _ = synced.Close() })
	s.store = watchedStore{client, synced}
	s.events = s.cfg.Events
	if s.events == nil {
		s.events = cloudevent.NewPublisher(js, s.cfg.Host.ID())
	}
	s.life = s.cfg.Lifecycle
	if s.life == nil {
		s.life = lifecycle.Client{NC: nc, Host: s.cfg.Host}
	}
	s.rtc = newRuntimeCache(s.life, s.cfg.RuntimeMaxAge)
	// Subscribed before the endpoints, so no change after the first call is missed.
	sub, err := nc.Subscribe(s.cfg.Host.Service(lifecycle.ServiceToken, lifecycle.SubjectChanged), func(m *nats.Msg) {
		if mark, err := envelope.ParseRuntimeMark(string(m.Data)); err == nil {
			s.rtc.heardOf(mark)
		}
	})
	if err != nil {
		return nil, fmt.Errorf("subscribe to runtime changes: %w", err)
	}
	context.AfterFunc(ctx, func() { _ = sub.Unsubscribe() })
	mux := rpc.NewMux(s.cfg.Registry, rpc.Properties, rep, s.log)
	mux.Auth = s.cfg.Auth
	mux.Local = s.cfg.Local
	mux.HandleUnknown()
	s.handlers(mux)
	return mux.Serve(ctx, nc, s.cfg.Host)
}

// runtime returns the runtime values of every qube that is not halted, as current as
// the caller's runtime mark at least.
func (s *Service) runtime(ctx context.Context, after envelope.RuntimeMark) (func(string) model.Runtime, error) {
	rt, _, err := s.runtimeGen(ctx, after)
	return rt, err
}

// runtimeGen is runtime with the number of the runtime snapshot (0: one not kept).
func (s *Service) runtimeGen(ctx context.Context, after envelope.RuntimeMark) (func(string) model.Runtime, uint64, error) {
	vals, gen, err := s.rtc.get(ctx, after, s.rep.Revision())
	if err != nil {
		return nil, 0, fmt.Errorf("runtime values: %w", err)
	}
	return lookupRuntime(vals), gen, nil
}

// cachedRuntimeRead serves a read of c's destination that needs runtime values from
// the reply cache, or computes it with f and keeps it.
func (s *Service) cachedRuntimeRead(ctx context.Context, c *rpc.Call, f func(m *model.Model) ([]byte, error)) ([]byte, error) {
	rt, gen, err := s.runtimeGen(ctx, c.After.Runtime)
	if err != nil {
		return nil, err
	}
	k := replyKey{c.Method.Name, c.Dest.Name}
	var out []byte
	ahead := false
	var at uint64
	s.rep.ViewIndexedAt(func(rev uint64, conf *config.Config, byName func(string) *config.Domain) {
		var ok bool
		if out, ok = s.replies.get(rev, gen, k); ok {
			return
		}
		if out, err = f(model.NewIndexed(conf, s.cfg.Machine, rt, byName)); err == nil {
			s.replies.put(rev, gen, k, out)
			ahead, at = k.method == getAllMethod && s.replies.missed(rev, gen), rev
		}
	})
	if ahead && s.serving != nil {
		go s.readAhead(s.serving, rt, at, gen)
	}
	return out, err
}

const getAllMethod = "admin.vm.property.GetAll"

// getAllText is the reply to admin.vm.property.GetAll of the qube name.
func getAllText(m *model.Model, name string) ([]byte, error) {
	h, err := m.Holder(name)
	if err != nil {
		return nil, err
	}
	return []byte(m.GetAllText(h)), nil
}

// readAhead computes the GetAll replies of every qube at revision rev and runtime
// snapshot gen that are not kept yet, in the order admin.vm.List gives them, for a
// client that asks them all in turn (qvm-ls): right after a change each is otherwise
// computed while the client waits, on one CPU. It stops once the cache moves on, or
// the service stops. One qube at a time, so the replica's writer waits at most one.
func (s *Service) readAhead(ctx context.Context, rt func(string) model.Runtime, rev, gen uint64) {
	computed := 0
	if s.aheadDone != nil {
		defer func() { s.aheadDone(computed) }()
	}
	var names []string
	s.rep.ViewIndexedAt(func(r uint64, conf *config.Config, _ func(string) *config.Domain) {
		if r != rev {
			return
		}
		names = make([]string, 0, len(conf.Domains))
		for i := range conf.Domains {
			names = append(names, conf.Domains[i].Name())
		}
	})
	for _, name := range names {
		if ctx.Err() != nil || !s.replies.current(rev, gen) {
			return
		}
		k := replyKey{getAllMethod, name}
		stale := false
		s.rep.ViewIndexedAt(func(r uint64, conf *config.Config, byName func(string) *config.Domain) {
			if stale = r != rev; stale {
				return
			}
			if _, ok := s.replies.get(rev, gen, k); ok {
				return
			}
			if out, err := getAllText(model.NewIndexed(conf, s.cfg.Machine, rt, byName), name); err == nil {
				s.replies.put(rev, gen, k, out)
				computed++
			}
		})
		if stale {
			return
		}
	}
}

// lookupRuntime reads the runtime of qubes that are not halted; the rest are Halted.
func lookupRuntime(vals map[string]model.Runtime) func(string) model.Runtime {
	return func(name string) model.Runtime {
		if r, ok := vals[name]; ok {
			return r
		}
		return model.Halted
	}
}

// view runs f over a model of the current configuration.
func (s *Service) view(rt func(string) model.Runtime, f func(m *model.Model) ([]byte, error)) ([]byte, error) {
	var out []byte
	var err error
	s.rep.ViewIndexed(func(c *config.Config, byName func(string) *config.Domain) {
		out, err = f(model.NewIndexed(c, s.cfg.Machine, rt, byName))
	})
	return out, err
}

// read serves a read-only call on the destination qube (or the global holder for the
// admin.property methods).
func (s *Service) read(ctx context.Context, c *rpc.Call, needRuntime bool, f func(m *model.Model, h model.Holder) ([]byte, error)) ([]byte, error) {
	var rt func(string) model.Runtime
	if needRuntime {
		var err error
		if rt, err = s.runtime(ctx, c.After.Runtime); err != nil {
			return nil, err
		}
	}
	return s.view(rt, func(m *model.Model) ([]byte, error) {
		h, err := s.holder(m, c)
		if err != nil {
			return nil, err
		}
		return f(m, h)
	})
}

func (s *Service) holder(m *model.Model, c *rpc.Call) (model.Holder, error) {
	if strings.HasPrefix(c.Method.Name, "admin.property.") {
		return model.Global, nil
	}
	return m.Holder(c.Dest.Name)
}

// maxRetries bounds how often a write is planned again after another writer changed
// the configuration first.
const maxRetries = 32

// write serves a call that changes the configuration: it plans the change over the
// current configuration, publishes the pre-events, applies the ops at the planned
// revision (planning again if another writer came first), brings this service's
// replica to the change (read-your-writes), sends the post-events, and replies once
// the change is durable and its post-events are stored.
//
// Only the apply and the post-events are serial (commit, under the write lock; the
// pre-events are stored before it): the next call applies as soon as this one's
// change is in the log and its post-events are sent. Durability
// and the post-events' acks are waited for outside the lock, so the changes of
// concurrent calls share one sync of the change log (group commit) and their events'
// acks arrive together; persistence writes qubes.xml after the replies (ChangesConfig).
func (s *Service) write(ctx context.Context, c *rpc.Call, plan func(m *model.Model, h model.Holder) (*model.Change, error)) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.WriteTimeout)
	defer cancel()
	ch, rev, posted, err := s.commit(ctx, c, plan)
	if err != nil {
		return nil, err
	}
	if rev != 0 {
		if err := s.store.Sync(ctx, rev); err != nil {
			// In the log but maybe not durable: not acknowledged, as qubesd fails a
			// call whose save failed (with the change made).
			return nil, fmt.Errorf("%w: %w", qerr.ErrAbort, err)
		}
	}
	if err := posted(ctx); err != nil {
		// The change stands, as in qubesd, where an exception in a handler of a
		// post-event leaves the change made. The call aborts (the client gets no
		// answer) and its post-events are missing from the stream.
		return nil, err
	}
	return []byte(ch.Reply), nil
}

// commit makes the change in two steps. First, under the lock of the call's key only
// (keys), it plans the change on the configuration as it is and stores the
// pre-events: nothing is applied unless they are stored, and a call refused by its
// plan ends there. Then, under the write lock, it plans again on the configuration
// as it is by then, applies, brings the replica to it and sends the post-events, so
// that changes and post-events are in one order.
//
// Storing the pre-events outside the write lock halves the time a change holds it,
// which bounds how many changes one instance makes per second. Calls on one key (a
// qube and the call's argument: one feature, one property) stay wholly serial, so
// they fire pre-event, event, pre-event, event as in qubesd. Calls on different keys
// may store their pre-events before an earlier change's post-events; and should
// another key's change alter what a plan's pre-events say (a global default under a
// property's value), the new pre-events are stored too before the change is applied.
//
// It returns the change's revision (0 if there was nothing to apply), which is not
// durable yet, and what waits for the post-events to be stored.
func (s *Service) commit(ctx context.Context, c *rpc.Call, plan func(m *model.Model, h model.Holder) (*model.Change, error)) (_ *model.Change, rev uint64, posted func(context.Context) error, _ error) {
	unlockKey := s.keys.lock(c.Dest.Name + "\x00" + c.Arg)
	defer unlockKey()
	planned, err := s.plan(ctx, c, plan)
	if err != nil {
		return nil, 0, nil, err
	}
	ch := planned.change
	// Nothing is applied unless the pre-events are stored: a failed publish aborts
	// the call with the configuration unchanged.
	if err := s.publish(ctx, ch.Pre); err != nil {
		return nil, 0, nil, err
	}
	if ch.Err != nil {
		return nil, 0, nil, ch.Err
	}
	published := ch.Pre

	s.wmu.Lock()
	defer s.wmu.Unlock()
	for attempt := 0; ; attempt++ {
		// The first plan stands if nothing changed since: no change, no new runtime.
		if attempt > 0 || !planned.current(s) {
			if planned, err = s.plan(ctx, c, plan); err != nil {
				return nil, 0, nil, err
			}
		}
		ch, rev := planned.change, planned.rev
		if !slices.EqualFunc(ch.Pre, published, sameEvent) {
			if err := s.publish(ctx, ch.Pre); err != nil {
				return nil, 0, nil, err
			}
			published = ch.Pre
		}
		if ch.Err != nil {
			return nil, 0, nil, ch.Err
		}
		// A new qube's volumes are made before it is added (qubesd's create_on_disk).
		undoVolumes, err := s.createVolumes(ctx, ch, rev)
		if err != nil {
			return nil, 0, nil, err
		}
		// Durability is waited for after the write lock is released (write), so that
		// concurrent changes share one sync; persistence writes qubes.xml after it.
		mut := config.Mutation{ExpectRevision: rev, Ops: ch.Ops, DeferSync: true,
			ChangesConfig: c.Method.ChangesConfig}
		newRev, err := s.store.Apply(ctx, mut)
		if err != nil {
			undoVolumes() // nothing half-made: the qube was not added
		}
		if errors.Is(err, config.ErrStaleRevision) && attempt < maxRetries {
			// Another writer came first: wait until the replica has seen it, plan again.
			if werr := s.rep.WaitRevision(ctx, rev+1); werr != nil {
				return nil, 0, nil, qerr.Abort("wait for config: " + werr.Error())
			}
			continue
		}
		if err != nil {
			return nil, 0, nil, fmt.Errorf("%w: apply: %w", qerr.ErrAbort, err)
		}
		if err := s.reflect(ctx, newRev, ch.Ops); err != nil {
			return nil, 0, nil, fmt.Errorf("%w: %w", qerr.ErrAbort, err)
		}
		s.rtc.advance(newRev, ch.Ops)
		// The change is in the change log (durable with the next sync) and every
		// replica has or will have it: it stands whatever becomes of its post-events.
		return ch, newRev, s.send(ctx, ch.Post), nil
	}
}

// planned is a change planned at a revision and runtime snapshot.
type planned struct {
	change *model.Change
	rev    uint64
	gen    uint64 // the runtime snapshot; 0 for one not kept
}

// current: the replica and the runtime values are still those the plan was made on.
func (p planned) current(s *Service) bool {
	return p.gen != 0 && s.rep.Revision() == p.rev && s.rtc.current(p.rev, p.gen)
}

// plan plans c's change on the replica as it is now, at the revision it reads.
func (s *Service) plan(ctx context.Context, c *rpc.Call, plan func(m *model.Model, h model.Holder) (*model.Change, error)) (planned, error) {
	rt, gen, err := s.runtimeGen(ctx, c.After.Runtime)
	if err != nil {
		return planned{}, err
	}
	p := planned{gen: gen}
	s.rep.ViewIndexedAt(func(rev uint64, conf *config.Config, byName func(string) *config.Domain) {
		p.rev = rev
		m := model.NewIndexed(conf, s.cfg.Machine, rt, byName)
		var h model.Holder
		if h, err = s.holder(m, c); err == nil {
			p.change, err = plan(m, h)
		}
	})
	return p, err
}

func sameEvent(a, b model.Event) bool {
	return a.VM == b.VM && a.Name == b.Name && slices.Equal(a.Kwargs, b.Kwargs)
}

// reflect brings the replica to revision rev, this service's own change (ops) applied
// at rev-1. When the replica is at rev-1 it applies ops itself rather than wait for the
// change log to deliver them (the same ops on the same state, as persistence did); the
// log's copy is then skipped. Otherwise another writer's record comes first: wait.
func (s *Service) reflect(ctx context.Context, rev uint64, ops []config.Op) error {
	if s.rep.Revision() == rev-1 {
		if err := s.rep.Apply(rev, ops); err == nil {
			return nil
		}
	}
	return s.rep.WaitRevision(ctx, rev)
}

// send sends evs and returns what waits for them to be stored.
func (s *Service) send(ctx context.Context, evs []model.Event) (wait func(context.Context) error) {
	if len(evs) == 0 {
		return func(context.Context) error { return nil }
	}
	w := s.events.Send(ctx, cloudEvents(evs)...)
	return func(ctx context.Context) error {
		if err := w(ctx); err != nil {
			return fmt.Errorf("%w: %w", qerr.ErrAbort, err)
		}
		return nil
	}
}

func cloudEvents(evs []model.Event) []cloudevent.Event {
	out := make([]cloudevent.Event, len(evs))
	for i, e := range evs {
		out[i] = cloudevent.New(e.VM, e.Name, e.Kwargs...)
	}
	return out
}

func (s *Service) publish(ctx context.Context, evs []model.Event) error {
	if len(evs) == 0 {
		return nil
	}
	if err := s.events.Publish(ctx, cloudEvents(evs)...); err != nil {
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

func (s *Service) vmList(ctx context.Context, c *rpc.Call) ([]byte, error) {
	return s.cachedRuntimeRead(ctx, c, func(m *model.Model) ([]byte, error) {
		// Appended, not formatted: a line per qube, 1 009 of them in qvm-ls's list.
		var b []byte
		line := func(d *config.Domain) {
			uuid := model.AdminVMUUID
			if d.Class != "AdminVM" {
				uuid, _ = d.Property("uuid")
			}
			name := d.Name()
			b = append(append(b, name...), " class="...)
			b = append(append(b, d.Class...), " state="...)
			b = append(append(b, m.PowerState(name)...), " uuid="...)
			b = append(append(b, uuid...), '\n')
		}
		if c.Dest.IsAdminVM() {
			ds := m.Domains()
			b = make([]byte, 0, 96*len(ds))
			for _, d := range ds {
				line(d)
			}
		} else if d := m.Domain(c.Dest.Name); d != nil {
			line(d)
		} else {
			return nil, qerr.VMNotFoundError("No such domain: " + qerr.Repr(c.Dest.Name))
		}
		return b, nil
	})
}

func (s *Service) vmclassList(context.Context, *rpc.Call) ([]byte, error) {
	return lines(model.VMClasses), nil
}

func (s *Service) deviceclassList(context.Context, *rpc.Call) ([]byte, error) {
	return lines(DeviceClasses), nil
}

// randomUUID returns a random (version 4) UUID.
func randomUUID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

// randomBelow draws a uniform random number in [0, n).
func randomBelow(n int) int {
	v, err := rand.Int(rand.Reader, big.NewInt(int64(n)))
	if err != nil {
		return 0
	}
	return int(v.Int64())
}

// createVolumes makes the volumes of the qube a change adds, if any, and returns how
// to remove them again. If they cannot be made, qubesd deletes the qube it added:
// the events up to its creation on disk are published, then its deletion, and the
// call fails with the storage's error.
func (s *Service) createVolumes(ctx context.Context, ch *model.Change, rev uint64) (undo func(), err error) {
	undo = func() {}
	if s.cfg.Volumes == nil {
		return undo, nil
	}
	var d *config.Domain
	for _, op := range ch.Ops {
		if op.Kind == config.OpAddDomain && op.New != nil {
			d = op.New
		}
	}
	if d == nil || d.VolumeConfig == "" {
		return undo, nil
	}
	name, vc := d.Name(), string(d.VolumeConfig)
	if err := s.cfg.Volumes.CreateVolumes(ctx, name, vc, rev); err != nil {
		var evs []model.Event
		for _, e := range ch.Post {
			if e.Name == "domain-create-on-disk" {
				break
			}
			evs = append(evs, e)
		}
		evs = append(evs, model.Ev("", "domain-pre-delete", "vm", name), model.Ev("", "domain-delete", "vm", name))
		if perr := s.publish(ctx, evs); perr != nil {
			return undo, perr
		}
		return undo, err
	}
	return func() {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.cfg.WriteTimeout)
		defer cancel()
		if err := s.cfg.Volumes.RemoveVolumes(rctx, name, vc, rev); err != nil {
			s.log.Error("remove the volumes of a qube not added", "qube", name, "err", err)
		}
	}, nil
}
