// Package metrics defines qubesbus's Prometheus metrics, registered on a registry the
// caller passes (never the global default one): the Admin API calls the gateway
// relays, the events published, and gauges read at scrape time from the parts of a
// running host (connections, replicas, the lifecycle lease, qubes.xml writes).
//
// Nothing here is on a call's path but Call.Observe and EventPublished: each looks up
// pre-curried children in a sync.Map and allocates nothing of its own.
package metrics

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/qubesbus/qubesbus/bus/cloudevent"
)

// Metric names, listed once (the README documents them).
const (
	APICalls          = "qubesbus_api_calls_total"
	APICallDuration   = "qubesbus_api_call_duration_seconds"
	EventsPublished   = "qubesbus_events_published_total"
	EventSubscribers  = "qubesbus_admin_events_subscribers"
	EventsRelayed     = "qubesbus_admin_events_relayed_total"
	ReplicaLag        = "qubesbus_replica_lag_revisions"
	ReplicaRevision   = "qubesbus_replica_revision"
	QubesXMLWrites    = "qubesbus_qubes_xml_writes_total"
	ConfigRevision    = "qubesbus_config_revision"
	AppliesRefused    = "qubesbus_config_applies_refused_total"
	LeaseHeld         = "qubesbus_lifecycle_lease_held"
	LeaseEpoch        = "qubesbus_lifecycle_lease_epoch"
	NATSConnected     = "qubesbus_nats_connected"
	NATSReconnects    = "qubesbus_nats_reconnects_total"
	maxEventTypes     = 256
	otherEventType    = "_other"
	unknownMethodName = "_unknown"
)

// Outcome of a call as its client sees it.
type Outcome int

const (
	OK        Outcome = iota // a result
	Exception                // a Qubes exception
	Abort                    // no reply: the connection closed without bytes
	nOutcomes
)

var outcomeNames = [nOutcomes]string{"ok", "exception", "abort"}

func (o Outcome) String() string { return outcomeNames[o] }

// Metrics holds the counters the gateway and the services update on their paths.
// A nil *Metrics is valid and records nothing.
type Metrics struct {
	calls   *prometheus.CounterVec
	latency *prometheus.HistogramVec
	events  *prometheus.CounterVec

	methods sync.Map // method name → *Call
	types   sync.Map // event type → prometheus.Counter
	ntypes  sync.Mutex
	seen    int
}

// New registers the call and event metrics on reg.
func New(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		calls: prometheus.NewCounterVec(prometheus.CounterOpts{Name: APICalls,
			Help: "Admin API calls relayed by the gateway, by method and outcome (ok, exception, abort)."},
			[]string{"method", "outcome"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: APICallDuration,
			Help:    "Time from a call's request read to its reply, by method.",
			Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30}},
			[]string{"method"}),
		events: prometheus.NewCounterVec(prometheus.CounterOpts{Name: EventsPublished,
			Help: "Events stored in QUBES_EVENTS by this process, by event type (the wire name before ':')."},
			[]string{"type"}),
	}
	reg.MustRegister(m.calls, m.latency, m.events)
	return m
}

// Call is the metrics of one method, curried once.
type Call struct {
	outcomes [nOutcomes]prometheus.Counter
	latency  prometheus.Observer
}

// Method returns the metrics of a method. The caller bounds the names (the gateway
// passes registered methods only, and "" for any other, counted as "_unknown"): a
// label value per client-chosen name would grow without end.
func (m *Metrics) Method(name string) *Call {
	if m == nil {
		return nil
	}
	if name == "" {
		name = unknownMethodName
	}
	if c, ok := m.methods.Load(name); ok {
		return c.(*Call)
	}
	c := &Call{latency: m.latency.WithLabelValues(name)}
	for o := range nOutcomes {
		c.outcomes[o] = m.calls.WithLabelValues(name, o.String())
	}
	got, _ := m.methods.LoadOrStore(name, c)
	return got.(*Call)
}

// Observe counts one call and its duration. A nil *Call records nothing.
func (c *Call) Observe(o Outcome, d time.Duration) {
	if c == nil {
		return
	}
	c.outcomes[o].Inc()
	c.latency.Observe(d.Seconds())
}

// ObserveCall counts one call of a method (see Method for the names) with its
// outcome as audit records name it ("ok", "exception", anything else an abort).
func (m *Metrics) ObserveCall(method, outcome string, d time.Duration) {
	if m == nil {
		return
	}
	o := Abort
	switch outcome {
	case "ok":
		o = OK
	case "exception":
		o = Exception
	}
	m.Method(method).Observe(o, d)
}

// EventPublished counts one stored event by its wire name's family
// ("property-set:netvm" counts as "property-set"). At most 256 types are told apart;
// any further one counts as "_other".
func (m *Metrics) EventPublished(name string) {
	if m == nil {
		return
	}
	typ, _, _ := strings.Cut(name, ":")
	if c, ok := m.types.Load(typ); ok {
		c.(prometheus.Counter).Inc()
		return
	}
	m.ntypes.Lock()
	c, ok := m.types.Load(typ)
	if !ok {
		label := typ
		if m.seen >= maxEventTypes {
			label = otherEventType
		}
		m.seen++
		c = m.events.WithLabelValues(label)
		m.types.Store(typ, c)
	}
	m.ntypes.Unlock()
	c.(prometheus.Counter).Inc()
}

// Sources are the parts of a running host the scrape-time metrics read. A nil field
// is left out.
type Sources struct {
	// Conns are the process's NATS connections (labelled by connection name).
	Conns func() []*nats.Conn
	// Subscribers is the number of admin.Events subscribers of the gateway.
	Subscribers func() int
	// EventsRelayed counts the events the gateway relayed to admin.Events subscribers
	// from the tap, from the fast path and from the stream's consumer.
	EventsRelayed func() (tapped, published, stored uint64)
	// Replicas are each service's replica revision and lag behind the configuration
	// store's revision (labelled by service).
	Replicas func() []ReplicaState
	// Store is the configuration store of this process.
	Store func() StoreState
	// Lease is this process's lifecycle lease: held, and the term's epoch.
	Lease func() (held bool, epoch uint64)
}

// StoreState is the configuration store of this process as a scrape sees it.
type StoreState struct {
	Revision uint64
	Writes   uint64 // of qubes.xml
	Refused  uint64 // mutations refused: an op not the caller's to change
}

// ReplicaState is one service's replica as a scrape sees it.
type ReplicaState struct {
	Service  string
	Revision uint64
	Lag      uint64 // revisions behind the store
}

// Register adds the scrape-time metrics of src to reg.
func Register(reg prometheus.Registerer, src Sources) {
	reg.MustRegister(&collector{src: src})
}

var (
	descSubscribers = prometheus.NewDesc(EventSubscribers, "admin.Events subscribers on the gateway's socket.", nil, nil)
	descRelayed     = prometheus.NewDesc(EventsRelayed, "Events the gateway relayed to admin.Events subscribers, by where it heard them first: tapped (a service of its process, as it sent them), published (its subject, the fast path) or stored (the stream's consumer: what the fast path missed).", []string{"path"}, nil)
	descLag         = prometheus.NewDesc(ReplicaLag, "Revisions a service's configuration replica is behind the store.", []string{"service"}, nil)
	descReplicaRev  = prometheus.NewDesc(ReplicaRevision, "Configuration revision a service's replica holds.", []string{"service"}, nil)
	descWrites      = prometheus.NewDesc(QubesXMLWrites, "qubes.xml writes by this persistence instance.", nil, nil)
	descConfigRev   = prometheus.NewDesc(ConfigRevision, "Configuration revision the persistence store holds.", nil, nil)
	descRefused     = prometheus.NewDesc(AppliesRefused, "Configuration changes this persistence instance refused because an op was not the sending service's to change.", nil, nil)
	descLeaseHeld   = prometheus.NewDesc(LeaseHeld, "1 while this vmlifecycle instance holds the host's lease, else 0 (standby).", nil, nil)
	descLeaseEpoch  = prometheus.NewDesc(LeaseEpoch, "Epoch of the lease term this instance holds (0 on standby).", nil, nil)
	descConnected   = prometheus.NewDesc(NATSConnected, "1 while a NATS connection is connected, else 0.", []string{"conn"}, nil)
	descReconnects  = prometheus.NewDesc(NATSReconnects, "Reconnects of a NATS connection.", []string{"conn"}, nil)
)

// collector reads Sources at scrape time.
type collector struct{ src Sources }

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descSubscribers, descRelayed, descLag, descReplicaRev, descWrites, descConfigRev,
		descRefused, descLeaseHeld, descLeaseEpoch, descConnected, descReconnects} {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	s := c.src
	if s.Subscribers != nil {
		ch <- prometheus.MustNewConstMetric(descSubscribers, prometheus.GaugeValue, float64(s.Subscribers()))
	}
	if s.EventsRelayed != nil {
		tapped, published, stored := s.EventsRelayed()
		ch <- prometheus.MustNewConstMetric(descRelayed, prometheus.CounterValue, float64(tapped), "tapped")
		ch <- prometheus.MustNewConstMetric(descRelayed, prometheus.CounterValue, float64(published), "published")
		ch <- prometheus.MustNewConstMetric(descRelayed, prometheus.CounterValue, float64(stored), "stored")
	}
	if s.Replicas != nil {
		for _, r := range s.Replicas() {
			ch <- prometheus.MustNewConstMetric(descLag, prometheus.GaugeValue, float64(r.Lag), r.Service)
			ch <- prometheus.MustNewConstMetric(descReplicaRev, prometheus.GaugeValue, float64(r.Revision), r.Service)
		}
	}
	if s.Store != nil {
		st := s.Store()
		ch <- prometheus.MustNewConstMetric(descWrites, prometheus.CounterValue, float64(st.Writes))
		ch <- prometheus.MustNewConstMetric(descConfigRev, prometheus.GaugeValue, float64(st.Revision))
		ch <- prometheus.MustNewConstMetric(descRefused, prometheus.CounterValue, float64(st.Refused))
	}
	if s.Lease != nil {
		held, epoch := s.Lease()
		ch <- prometheus.MustNewConstMetric(descLeaseHeld, prometheus.GaugeValue, b2f(held))
		ch <- prometheus.MustNewConstMetric(descLeaseEpoch, prometheus.GaugeValue, float64(epoch))
	}
	if s.Conns != nil {
		seen := map[string]int{}
		for _, nc := range s.Conns() {
			name := nc.Opts.Name
			if n := seen[name]; n > 0 { // a label set may appear once per scrape
				name = fmt.Sprintf("%s#%d", name, n)
			}
			seen[nc.Opts.Name]++
			ch <- prometheus.MustNewConstMetric(descConnected, prometheus.GaugeValue, b2f(nc.Status() == nats.CONNECTED), name)
			ch <- prometheus.MustNewConstMetric(descReconnects, prometheus.CounterValue, float64(nc.Stats().Reconnects), name)
		}
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// Publisher stores events (cloudevent.Publisher): Publish returns once they are
// stored, Send sends them now and returns what waits for their acks.
type Publisher interface {
	Publish(ctx context.Context, events ...cloudevent.Event) error
	Send(ctx context.Context, events ...cloudevent.Event) (wait func(context.Context) error)
}

// CountingPublisher counts the events its Publisher stored (EventPublished).
type CountingPublisher struct {
	Publisher
	M *Metrics
}

// Publish publishes and, once they are stored, counts the events.
func (p CountingPublisher) Publish(ctx context.Context, events ...cloudevent.Event) error {
	if err := p.Publisher.Publish(ctx, events...); err != nil {
		return err
	}
	p.count(events)
	return nil
}

// Send sends through the Publisher and counts the events once they are stored.
func (p CountingPublisher) Send(ctx context.Context, events ...cloudevent.Event) (wait func(context.Context) error) {
	w := p.Publisher.Send(ctx, events...)
	return func(ctx context.Context) error {
		if err := w(ctx); err != nil {
			return err
		}
		p.count(events)
		return nil
	}
}

func (p CountingPublisher) count(events []cloudevent.Event) {
	for _, e := range events {
		p.M.EventPublished(e.Name)
	}
}
