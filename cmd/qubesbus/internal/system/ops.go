package system

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/qubesbus/qubesbus/bus/cloudevent"
	"github.com/qubesbus/qubesbus/bus/metrics"
	"github.com/qubesbus/qubesbus/bus/rpc"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/schemas/configstore"
	"github.com/qubesbus/qubesbus/schemas/replica"
	"github.com/qubesbus/qubesbus/services/gateway"
	"github.com/qubesbus/qubesbus/services/persistence"
)

// observed is what a running host shows its operators: the metrics it counts and the
// parts the scrape-time metrics and the readiness check read. Each part is set once
// it serves.
type observed struct {
	metrics *metrics.Metrics // nil without Config.Metrics
	started atomic.Bool      // Start (or StartService) has returned

	cmu sync.Mutex // guards System.conns

	rmu      sync.Mutex
	replicas []followed

	store   atomic.Pointer[persistence.Store]
	gateway atomic.Pointer[gateway.Server]
	lease   atomic.Pointer[leaseView] // set when a lifecycle instance runs here
	epoch   atomic.Uint64             // the lease term this instance serves; 0 on standby
}

// followed is a service's replica and the connection it follows the change log on.
type followed struct {
	service string
	rep     *replica.Replica
	store   configstore.Client
}

// leaseView reads the host's lifecycle lease.
type leaseView struct {
	kv  jetstream.KeyValue
	key string
}

func (o *observed) addReplica(service string, rep *replica.Replica, nc *nats.Conn) {
	o.rmu.Lock()
	defer o.rmu.Unlock()
	o.replicas = append(o.replicas, followed{service: service, rep: rep, store: configstore.Client{NC: nc}})
}

func (o *observed) followedReplicas() []followed {
	o.rmu.Lock()
	defer o.rmu.Unlock()
	return slices.Clone(o.replicas)
}

func (s *System) addConn(nc *nats.Conn) {
	s.obs.cmu.Lock()
	s.conns = append(s.conns, nc)
	s.obs.cmu.Unlock()
}

// Conns are the system's NATS connections.
func (s *System) Conns() []*nats.Conn {
	s.obs.cmu.Lock()
	defer s.obs.cmu.Unlock()
	return slices.Clone(s.conns)
}

// initMetrics registers the host's metrics on reg (nil: none).
func (s *System) initMetrics(reg prometheus.Registerer) {
	if reg == nil {
		return
	}
	s.obs.metrics = metrics.New(reg)
	metrics.Register(reg, metrics.Sources{
		Conns: s.Conns,
		Subscribers: func() int {
			if gw := s.obs.gateway.Load(); gw != nil {
				return gw.Subscribers()
			}
			return 0
		},
		EventsRelayed: func() (tapped, published, stored uint64) {
			if gw := s.obs.gateway.Load(); gw != nil {
				return gw.EventsRelayed()
			}
			return 0, 0, 0
		},
		Replicas: func() []metrics.ReplicaState {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			var out []metrics.ReplicaState
			for _, f := range s.obs.followedReplicas() {
				rev := f.rep.Revision()
				st := metrics.ReplicaState{Service: f.service, Revision: rev}
				if target, err := s.storeRevision(ctx, f); err == nil && target > rev {
					st.Lag = target - rev
				}
				out = append(out, st)
			}
			return out
		},
		Store: func() metrics.StoreState {
			if st := s.obs.store.Load(); st != nil {
				m := st.Metrics()
				return metrics.StoreState{Revision: m.Revision, Writes: m.Writes, Refused: m.Refused}
			}
			return metrics.StoreState{}
		},
		Lease: func() (bool, uint64) {
			if s.obs.lease.Load() == nil {
				return false, 0
			}
			e := s.obs.epoch.Load()
			return e != 0, e
		},
	})
}

// eventsPublisher is the events publisher of a service on nc: it passes each event
// to the tap of this process's gateway (see gateway.EventsConfig.Tap) and, when the
// host has metrics, counts the events it stored.
func (s *System) eventsPublisher(nc *nats.Conn, host subject.Host) (metrics.Publisher, error) {
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, fmt.Errorf("jetstream: %w", err)
	}
	p := cloudevent.NewPublisher(js, host.ID()).WithTap(&s.tap)
	if s.obs.metrics == nil {
		return p, nil
	}
	return metrics.CountingPublisher{Publisher: p, M: s.obs.metrics}, nil
}

// EventsPublisher is a publisher of the host's events on nc as the services of this
// process have: its events reach this process's admin.Events through the tap.
func (s *System) EventsPublisher(nc *nats.Conn) (metrics.Publisher, error) {
	return s.eventsPublisher(nc, subject.ForHost(s.cfg.HostID))
}

// observeService is what a service that reads the host's configuration and
// publishes events needs to be seen by the operators: the host's replica (the one this
// process follows already, else one followed on nc, as by a single service of
// `qubesbus serve`), listed under the service's name in the readiness check and the
// replica metrics, and its events publisher (eventsPublisher).
func (s *System) observeService(name rpc.Service, nc *nats.Conn, host subject.Host, log *slog.Logger) (*replica.Replica, metrics.Publisher, error) {
	events, err := s.eventsPublisher(nc, host)
	if err != nil {
		return nil, nil, err
	}
	rep := s.replica
	if rep == nil {
		if rep, err = replica.Follow(s.ctx, nc, host, log); err != nil {
			return nil, nil, err
		}
		s.replica = rep
	}
	s.obs.addReplica(string(name), rep, nc)
	return rep, events, nil
}

// storeRevision is the configuration store's revision: the store's own in this process,
// else persistence's answer over the replica's connection.
func (s *System) storeRevision(ctx context.Context, f followed) (uint64, error) {
	if st := s.obs.store.Load(); st != nil {
		return st.Revision(), nil
	}
	c := f.store
	c.Host = subject.ForHost(s.cfg.HostID)
	m, err := c.Metrics(ctx)
	return m.Revision, err
}

// Check is one part of a readiness report.
type Check struct {
	Name   string `json:"name"`
	OK     bool   `json:"ok"`
	Detail string `json:"detail,omitempty"`
}

// Ready checks that the host serves: it has started, every NATS connection is
// connected, every service's replica has reached the store's revision (waiting up to
// a second for one that follows closely), and the lifecycle lease is held, here or by
// another instance this one stands by for.
func (s *System) Ready(ctx context.Context) []Check {
	var out []Check
	if !s.obs.started.Load() {
		out = append(out, Check{Name: "start-up", Detail: "starting"})
	}
	for _, nc := range s.Conns() {
		st := nc.Status()
		out = append(out, Check{Name: "nats " + nc.Opts.Name, OK: st == nats.CONNECTED, Detail: st.String()})
	}
	for _, f := range s.obs.followedReplicas() {
		out = append(out, s.replicaCheck(ctx, f))
	}
	if lv := s.obs.lease.Load(); lv != nil {
		out = append(out, s.leaseCheck(ctx, lv))
	}
	return out
}

func (s *System) replicaCheck(ctx context.Context, f followed) Check {
	c := Check{Name: "replica " + f.service}
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	target, err := s.storeRevision(ctx, f)
	if err != nil {
		c.Detail = fmt.Sprintf("revision %d; store unreachable: %v", f.rep.Revision(), err)
		return c
	}
	if err := f.rep.WaitRevision(ctx, target); err != nil {
		c.Detail = fmt.Sprintf("revision %d behind the store's %d", f.rep.Revision(), target)
		return c
	}
	c.OK, c.Detail = true, fmt.Sprintf("revision %d", f.rep.Revision())
	return c
}

func (s *System) leaseCheck(ctx context.Context, lv *leaseView) Check {
	c := Check{Name: "lifecycle lease"}
	if e := s.obs.epoch.Load(); e != 0 {
		c.OK, c.Detail = true, fmt.Sprintf("held, epoch %d", e)
		return c
	}
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	e, err := lv.kv.Get(ctx, lv.key)
	switch {
	case err == nil:
		c.OK, c.Detail = true, fmt.Sprintf("standby; held by %s, epoch %d", e.Value(), e.Revision())
	case errors.Is(err, jetstream.ErrKeyNotFound):
		c.Detail = "nobody holds it"
	default:
		c.Detail = "unreadable: " + err.Error()
	}
	return c
}
