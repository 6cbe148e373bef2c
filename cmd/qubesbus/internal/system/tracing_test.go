package system

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"

	"github.com/qubesbus/qubesbus/bus/tracing"
	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/access"
)

// endSignal tells the test each time a span has ended (after the exporter before it
// has taken the span), so that the test waits for spans rather than sleeping.
type endSignal struct{ ch chan struct{} }

func (e endSignal) OnStart(context.Context, sdktrace.ReadWriteSpan) {}
func (e endSignal) OnEnd(sdktrace.ReadOnlySpan) {
	select {
	case e.ch <- struct{}{}:
	default:
	}
}
func (e endSignal) Shutdown(context.Context) error   { return nil }
func (e endSignal) ForceFlush(context.Context) error { return nil }

// traceSpans installs an SDK tracer provider with an in-memory exporter as the global
// provider for the test (no-op again after it).
func traceSpans(t *testing.T) (*tracetest.InMemoryExporter, endSignal) {
	exp := tracetest.NewInMemoryExporter()
	sig := endSignal{ch: make(chan struct{}, 1)}
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp), sdktrace.WithSpanProcessor(sig))
	otel.SetTracerProvider(tp)
	t.Cleanup(func() {
		otel.SetTracerProvider(noop.NewTracerProvider())
		_ = tp.Shutdown(context.Background())
	})
	return exp, sig
}

// waitSpans waits until the exporter holds every span named in names, in the trace
// of the span named root (the last one ended under that name), and returns them by
// name.
func waitSpans(t *testing.T, exp *tracetest.InMemoryExporter, sig endSignal, root string, names ...string) map[string]tracetest.SpanStub {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		byName := map[string]tracetest.SpanStub{}
		spans := exp.GetSpans()
		var tid trace.TraceID
		for _, s := range spans {
			if s.Name == root {
				tid = s.SpanContext.TraceID()
			}
		}
		for _, s := range spans {
			if s.SpanContext.TraceID() == tid {
				byName[s.Name] = s
			}
		}
		missing := ""
		for _, n := range names {
			if _, ok := byName[n]; !ok {
				missing = n
			}
		}
		if missing == "" {
			return byName
		}
		select {
		case <-sig.ch:
		case <-timeout:
			t.Fatalf("no span %q in the trace of %q; have %d spans", missing, root, len(spans))
		}
	}
}

func attrs(s tracetest.SpanStub) map[attribute.Key]string {
	m := map[attribute.Key]string{}
	for _, kv := range s.Attributes {
		m[kv.Key] = kv.Value.Emit()
	}
	return m
}

// TestOneTracePerCall: a property.Set over the socket is one trace, from the
// gateway's span through the properties service's server span (over NATS) to
// persistence's apply (in the same process, configstore.Local), each the child of
// the one before.
func TestOneTracePerCall(t *testing.T) {
	exp, sig := traceSpans(t)
	sys := startSystem(t)
	if got := string(roundTrip(t, sys.Socket, []byte("admin.vm.property.Set+label dom0 name work\x00red"))); got != "0\x00" {
		t.Fatalf("property.Set answered %q", got)
	}
	const (
		gw    = "admin.vm.property.Set"
		props = "properties admin.vm.property.Set"
		store = "persistence apply"
	)
	spans := waitSpans(t, exp, sig, gw, gw, props, store)
	chain := []struct {
		name, parent string
		kind         trace.SpanKind
	}{
		{gw, "", trace.SpanKindServer},
		{props, gw, trace.SpanKindServer},
		{store, props, trace.SpanKindServer},
	}
	for _, c := range chain {
		s := spans[c.name]
		if s.SpanKind != c.kind {
			t.Errorf("%s: kind %v, want %v", c.name, s.SpanKind, c.kind)
		}
		if c.parent == "" {
			if s.Parent.IsValid() {
				t.Errorf("%s: parent %v, want a root span", c.name, s.Parent.SpanID())
			}
			continue
		}
		if want := spans[c.parent].SpanContext.SpanID(); s.Parent.SpanID() != want {
			t.Errorf("%s: parent %v, want %s (%v)", c.name, s.Parent.SpanID(), c.parent, want)
		}
	}
	// Across NATS the parent is remote; within the process it is not.
	if !spans[props].Parent.IsRemote() || spans[store].Parent.IsRemote() {
		t.Errorf("remote parents: properties %v, persistence %v",
			spans[props].Parent.IsRemote(), spans[store].Parent.IsRemote())
	}
	want := map[attribute.Key]string{tracing.AttrMethod: gw, tracing.AttrSource: "dom0", tracing.AttrDest: "work", tracing.AttrOutcome: "ok"}
	for _, name := range []string{gw, props} {
		got := attrs(spans[name])
		for k, v := range want {
			if got[k] != v {
				t.Errorf("%s: %s=%q, want %q", name, k, got[k], v)
			}
		}
	}

	// An exception is an outcome with its class, on both sides.
	if got := string(roundTrip(t, sys.Socket, []byte("admin.vm.property.Get+no_such dom0 name work\x00"))); got[0] != '2' {
		t.Fatalf("property.Get of no property answered %q", got)
	}
	spans = waitSpans(t, exp, sig, "admin.vm.property.Get", "admin.vm.property.Get", "properties admin.vm.property.Get")
	for _, name := range []string{"admin.vm.property.Get", "properties admin.vm.property.Get"} {
		got := attrs(spans[name])
		if got[tracing.AttrOutcome] != "exception" || got[tracing.AttrException] != "QubesNoSuchPropertyError" {
			t.Errorf("%s: outcome %q, exception %q", name, got[tracing.AttrOutcome], got[tracing.AttrException])
		}
	}
}

// TestNoTraceContextWhenOff: with no tracer provider installed, no request on the
// bus (the gateway's, properties' to persistence) carries a traceparent header.
func TestNoTraceContextWhenOff(t *testing.T) {
	if tracing.On() {
		t.Fatal("tracing on without a provider")
	}
	sys := startSystem(t)
	mon := connectAs(t, sys, access.Admin)
	var (
		mu     sync.Mutex
		traced []string
	)
	seen := make(chan string, 1024)
	sub, err := mon.Subscribe("qubes.v1.test.>", func(m *nats.Msg) {
		if m.Header.Get(tracing.HeaderTraceparent) != "" || m.Header.Get(tracing.HeaderTracestate) != "" {
			mu.Lock()
			traced = append(traced, m.Subject)
			mu.Unlock()
		}
		select {
		case seen <- m.Subject:
		default:
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := mon.Flush(); err != nil {
		t.Fatal(err)
	}
	if got := string(roundTrip(t, sys.Socket, []byte("admin.vm.property.Set+label dom0 name work\x00red"))); got != "0\x00" {
		t.Fatalf("property.Set answered %q", got)
	}
	// Wait until the monitor has seen the call's request and its change's append.
	want := map[string]bool{"qubes.v1.test.api.admin.vm.property.Set": false, "qubes.v1.test.config": false}
	timeout := time.After(10 * time.Second)
	for n := 0; n < len(want); {
		select {
		case subj := <-seen:
			if done, ok := want[subj]; ok && !done {
				want[subj] = true
				n++
			}
		case <-timeout:
			t.Fatalf("monitor saw %v", want)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if len(traced) > 0 {
		t.Errorf("messages with trace context while tracing is off: %q", traced)
	}
}
