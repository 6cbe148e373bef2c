package tracing

import (
	"context"
	"encoding/binary"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/nats-io/nats.go"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
)

// recorder is a tracer provider that gives each span fresh ids and keeps, for each,
// its name, kind and parent: enough to check propagation without the SDK, which bus/
// does not depend on.
type recorder struct {
	noop.TracerProvider
	next  atomic.Uint64
	mu    sync.Mutex
	spans []recorded
}

type recorded struct {
	name   string
	kind   trace.SpanKind
	sc     trace.SpanContext
	parent trace.SpanContext
}

func (r *recorder) Tracer(string, ...trace.TracerOption) trace.Tracer { return recTracer{r: r} }

type recTracer struct {
	noop.Tracer
	r *recorder
}

func (t recTracer) Start(ctx context.Context, name string, opts ...trace.SpanStartOption) (context.Context, trace.Span) {
	parent := trace.SpanContextFromContext(ctx)
	cfg := trace.NewSpanStartConfig(opts...)
	var sid trace.SpanID
	binary.BigEndian.PutUint64(sid[:], t.r.next.Add(1))
	tid := parent.TraceID()
	if !parent.IsValid() {
		binary.BigEndian.PutUint64(tid[8:], t.r.next.Add(1))
	}
	sc := trace.NewSpanContext(trace.SpanContextConfig{TraceID: tid, SpanID: sid, TraceFlags: trace.FlagsSampled})
	t.r.mu.Lock()
	t.r.spans = append(t.r.spans, recorded{name: name, kind: cfg.SpanKind(), sc: sc, parent: parent})
	t.r.mu.Unlock()
	return trace.ContextWithSpan(ctx, recSpan{sc: sc}), recSpan{sc: sc}
}

type recSpan struct {
	noop.Span
	sc trace.SpanContext
}

func (s recSpan) SpanContext() trace.SpanContext { return s.sc }
func (s recSpan) IsRecording() bool              { return true }

// install makes a recorder the global provider for one test, and no-op after it.
func install(t *testing.T) *recorder {
	r := &recorder{}
	otel.SetTracerProvider(r)
	t.Cleanup(func() { otel.SetTracerProvider(noop.NewTracerProvider()) })
	return r
}

// Off (OpenTelemetry's default provider, or a no-op one) nothing touches a header
// and nothing allocates.
func TestOffTouchesNothing(t *testing.T) {
	if otel.GetTracerProvider() == defaultProvider && On() {
		t.Fatal("on with OpenTelemetry's default provider")
	}
	otel.SetTracerProvider(noop.NewTracerProvider())
	if On() {
		t.Fatal("on with a no-op provider")
	}
	ctx := context.Background()
	msg := &nats.Msg{Subject: "qubes.v1.local.store.apply"}
	in := nats.Header{}
	allocs := testing.AllocsPerRun(100, func() { hooks(ctx, in, msg) })
	if allocs != 0 {
		t.Errorf("%v allocations per call with tracing off, want 0", allocs)
	}
	if msg.Header != nil {
		t.Errorf("header written with tracing off: %v", msg.Header)
	}
}

// hooks is every call the request path makes into this package, in its order.
func hooks(ctx context.Context, in nats.Header, msg *nats.Msg) {
	sctx, server := StartServer(ctx, in, "properties admin.vm.property.Set")
	Call(server, "admin.vm.property.Set", "dom0", "work")
	cctx, client := StartClient(sctx, msg)
	Inject(cctx, msg)
	Fail(client, nil)
	client.End()
	Outcome(server, "ok", "")
	server.End()
}

// On, a client span's context travels in the header and the server span continues
// its trace as its child.
func TestPropagatesThroughHeaders(t *testing.T) {
	r := install(t)
	if !On() {
		t.Fatal("off with a provider installed")
	}
	ctx, root := Start(context.Background(), "admin.vm.property.Set", trace.SpanKindServer)
	msg := &nats.Msg{Subject: "qubes.v1.local.store.apply"}
	_, client := StartClient(ctx, msg)
	if got := msg.Header.Get(HeaderTraceparent); len(got) != 55 {
		t.Fatalf("traceparent %q", got)
	}
	_, server := StartServer(context.Background(), msg.Header, "persistence apply")
	// A header without trace context starts a trace of its own.
	_, lone := StartServer(context.Background(), nats.Header{"Qubes-Method": {"x"}}, "lone")

	want := []struct {
		name   string
		kind   trace.SpanKind
		parent trace.SpanContext
	}{
		{"admin.vm.property.Set", trace.SpanKindServer, trace.SpanContext{}},
		{"qubes.v1.local.store.apply", trace.SpanKindClient, root.SpanContext()},
		{"persistence apply", trace.SpanKindServer, client.SpanContext()},
		{"lone", trace.SpanKindServer, trace.SpanContext{}},
	}
	if len(r.spans) != len(want) {
		t.Fatalf("%d spans, want %d", len(r.spans), len(want))
	}
	for i, w := range want {
		s := r.spans[i]
		if s.name != w.name || s.kind != w.kind {
			t.Errorf("span %d: %s %v, want %s %v", i, s.name, s.kind, w.name, w.kind)
		}
		if s.parent.TraceID() != w.parent.TraceID() || s.parent.SpanID() != w.parent.SpanID() {
			t.Errorf("span %s: parent %v, want %v", s.name, s.parent, w.parent)
		}
	}
	if server.SpanContext().TraceID() != root.SpanContext().TraceID() {
		t.Error("server span in another trace than the root")
	}
	if lone.SpanContext().TraceID() == root.SpanContext().TraceID() {
		t.Error("a request without trace context joined another trace")
	}
	if !r.spans[2].parent.IsRemote() {
		t.Error("server span's parent not marked remote")
	}
}

// Inject without a span in the context leaves the message alone, also when on.
func TestInjectWithoutSpan(t *testing.T) {
	install(t)
	msg := &nats.Msg{Subject: "s"}
	Inject(context.Background(), msg)
	if msg.Header != nil {
		t.Errorf("header written without a span: %v", msg.Header)
	}
}

// BenchmarkHooks is the cost of every call the request path makes into this package,
// off (what each call now pays) and on (with a provider that records nothing but ids).
func BenchmarkHooks(b *testing.B) {
	ctx := context.Background()
	b.Run("off", func(b *testing.B) {
		otel.SetTracerProvider(noop.NewTracerProvider())
		msg := &nats.Msg{Subject: "qubes.v1.local.store.apply"}
		in := nats.Header{}
		b.ReportAllocs()
		for b.Loop() {
			hooks(ctx, in, msg)
		}
	})
	b.Run("on", func(b *testing.B) {
		otel.SetTracerProvider(&recorder{})
		defer otel.SetTracerProvider(noop.NewTracerProvider())
		b.ReportAllocs()
		for b.Loop() {
			msg := &nats.Msg{Subject: "qubes.v1.local.store.apply"}
			hooks(ctx, nats.Header{}, msg)
		}
	})
}
