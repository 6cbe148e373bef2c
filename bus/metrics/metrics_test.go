package metrics

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestCallsAndEvents(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg)
	m.Method("admin.vm.List").Observe(OK, 2*time.Millisecond)
	m.Method("admin.vm.List").Observe(Exception, time.Millisecond)
	m.ObserveCall("", "abort", time.Millisecond)
	for range 2 {
		m.EventPublished("property-set:netvm")
	}
	for i := range maxEventTypes + 10 {
		m.EventPublished(fmt.Sprintf("t%d", i))
	}
	want := `
# HELP qubesbus_api_calls_total Admin API calls relayed by the gateway, by method and outcome (ok, exception, abort).
# TYPE qubesbus_api_calls_total counter
qubesbus_api_calls_total{method="_unknown",outcome="abort"} 1
qubesbus_api_calls_total{method="_unknown",outcome="exception"} 0
qubesbus_api_calls_total{method="_unknown",outcome="ok"} 0
qubesbus_api_calls_total{method="admin.vm.List",outcome="abort"} 0
qubesbus_api_calls_total{method="admin.vm.List",outcome="exception"} 1
qubesbus_api_calls_total{method="admin.vm.List",outcome="ok"} 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), APICalls); err != nil {
		t.Error(err)
	}
	if got := testutil.ToFloat64(m.events.WithLabelValues("property-set")); got != 2 {
		t.Errorf("property-set events = %v, want 2", got)
	}
	// One type was seen before the 256 distinct ones: 255 of those have their own label.
	if got := testutil.ToFloat64(m.events.WithLabelValues(otherEventType)); got != 11 {
		t.Errorf("_other events = %v, want 11", got)
	}
	if n := testutil.CollectAndCount(m.events); n != maxEventTypes+1 {
		t.Errorf("%d event type series, want %d", n, maxEventTypes+1)
	}
	if n := testutil.CollectAndCount(m.latency); n != 2 {
		t.Errorf("%d latency series, want 2", n)
	}
}

func TestNilRecordsNothing(t *testing.T) {
	var m *Metrics
	m.Method("x").Observe(OK, time.Second)
	m.EventPublished("domain-start")
}

func TestHotPathDoesNotAllocate(t *testing.T) {
	m := New(prometheus.NewRegistry())
	m.Method("admin.vm.List")
	m.EventPublished("domain-start")
	if n := testing.AllocsPerRun(100, func() {
		m.Method("admin.vm.List").Observe(OK, time.Millisecond)
		m.ObserveCall("admin.vm.List", "exception", time.Millisecond)
		m.EventPublished("domain-start")
	}); n != 0 {
		t.Errorf("%v allocations per call, want 0", n)
	}
}

func TestSources(t *testing.T) {
	reg := prometheus.NewRegistry()
	Register(reg, Sources{
		Subscribers:   func() int { return 3 },
		EventsRelayed: func() (uint64, uint64, uint64) { return 35, 40, 2 },
		Replicas:      func() []ReplicaState { return []ReplicaState{{Service: "properties", Revision: 7, Lag: 2}} },
		Store:         func() StoreState { return StoreState{Revision: 9, Writes: 4, Refused: 1} },
		Lease:         func() (bool, uint64) { return true, 12 },
	})
	want := `
# HELP qubesbus_admin_events_subscribers admin.Events subscribers on the gateway's socket.
# TYPE qubesbus_admin_events_subscribers gauge
qubesbus_admin_events_subscribers 3
# HELP qubesbus_admin_events_relayed_total Events the gateway relayed to admin.Events subscribers, by where it heard them first: tapped (a service of its process, as it sent them), published (its subject, the fast path) or stored (the stream's consumer: what the fast path missed).
# TYPE qubesbus_admin_events_relayed_total counter
qubesbus_admin_events_relayed_total{path="published"} 40
qubesbus_admin_events_relayed_total{path="stored"} 2
qubesbus_admin_events_relayed_total{path="tapped"} 35
# HELP qubesbus_replica_lag_revisions Revisions a service's configuration replica is behind the store.
# TYPE qubesbus_replica_lag_revisions gauge
qubesbus_replica_lag_revisions{service="properties"} 2
# HELP qubesbus_qubes_xml_writes_total qubes.xml writes by this persistence instance.
# TYPE qubesbus_qubes_xml_writes_total counter
qubesbus_qubes_xml_writes_total 4
# HELP qubesbus_config_applies_refused_total Configuration changes this persistence instance refused because an op was not the sending service's to change.
# TYPE qubesbus_config_applies_refused_total counter
qubesbus_config_applies_refused_total 1
# HELP qubesbus_lifecycle_lease_held 1 while this vmlifecycle instance holds the host's lease, else 0 (standby).
# TYPE qubesbus_lifecycle_lease_held gauge
qubesbus_lifecycle_lease_held 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), EventSubscribers, EventsRelayed, ReplicaLag, QubesXMLWrites, AppliesRefused, LeaseHeld); err != nil {
		t.Error(err)
	}
}
