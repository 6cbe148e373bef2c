// Package tracing carries OpenTelemetry trace context across NATS requests, as W3C
// traceparent and tracestate headers, and starts the spans of the request path.
//
// It uses only the OpenTelemetry API. The global tracer provider decides whether
// anything is recorded: cmd/qubesbus installs the SDK when the OTEL_* variables ask
// for it. While the provider is OpenTelemetry's default or a no-op one, tracing is
// off and every function here returns at once: no span, no header, no allocation.
package tracing

import (
	"context"
	"strings"

	"github.com/nats-io/nats.go"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
)

// ScopeName is the instrumentation scope of every span qubesbus starts.
const ScopeName = "github.com/qubesbus/qubesbus"

// Header names of W3C trace context, as the propagator writes them.
const (
	HeaderTraceparent = "traceparent"
	HeaderTracestate  = "tracestate"
)

// Attribute keys of qubesbus spans.
const (
	AttrMethod    = attribute.Key("rpc.method")
	AttrSource    = attribute.Key("qubes.source")
	AttrDest      = attribute.Key("qubes.dest")
	AttrOutcome   = attribute.Key("qubes.outcome")
	AttrException = attribute.Key("qubes.exception")
	AttrSubject   = attribute.Key("messaging.destination.name")
	AttrSystem    = attribute.Key("messaging.system")
)

// defaultProvider is OpenTelemetry's global provider before anyone sets one: with no
// delegate it records nothing.
var defaultProvider = otel.GetTracerProvider()

// noopSpan is what the functions return while tracing is off.
var noopSpan = trace.SpanFromContext(context.Background())

// w3c is the propagator of every NATS message: fixed rather than the global one, so
// that services speak W3C trace context whatever a process configures.
var w3c = propagation.TraceContext{}

// On reports whether a recording tracer provider is installed.
func On() bool {
	tp := otel.GetTracerProvider()
	if tp == defaultProvider {
		return false
	}
	_, isNoop := tp.(noop.TracerProvider)
	return !isNoop
}

// Start starts a span of kind under ctx's span. Off, it returns ctx and a no-op span.
func Start(ctx context.Context, name string, kind trace.SpanKind) (context.Context, trace.Span) {
	if !On() {
		return ctx, noopSpan
	}
	return start(ctx, name, kind)
}

func start(ctx context.Context, name string, kind trace.SpanKind) (context.Context, trace.Span) {
	return otel.GetTracerProvider().Tracer(ScopeName).Start(ctx, name, trace.WithSpanKind(kind))
}

// StartServer starts the server span of a request received with header h, as a
// child of the caller's span when h carries one.
func StartServer(ctx context.Context, h nats.Header, name string) (context.Context, trace.Span) {
	if !On() {
		return ctx, noopSpan
	}
	if len(h[HeaderTraceparent]) > 0 {
		ctx = w3c.Extract(ctx, carrier(h))
	}
	return start(ctx, name, trace.SpanKindServer)
}

// StartClient starts the client span of a request and writes it into msg's header.
// Its name is the subject: subjects of requests name a host and an operation, never
// a client's bytes.
func StartClient(ctx context.Context, msg *nats.Msg) (context.Context, trace.Span) {
	if !On() {
		return ctx, noopSpan
	}
	// A copy: msg's contents must not escape through the span, or every caller's
	// subject would be allocated on the heap, traced or not.
	subject := strings.Clone(msg.Subject)
	ctx, span := start(ctx, subject, trace.SpanKindClient)
	if span.IsRecording() {
		span.SetAttributes(AttrSystem.String("nats"), AttrSubject.String(subject))
	}
	Inject(ctx, msg)
	return ctx, span
}

// Inject writes ctx's span context into msg's header, creating the header if needed.
// Off, or without a span in ctx, it leaves msg alone.
func Inject(ctx context.Context, msg *nats.Msg) {
	if !On() || !trace.SpanContextFromContext(ctx).IsValid() {
		return
	}
	// Through a carrier of its own, for the same reason as StartClient's copy.
	c := propagation.MapCarrier{}
	w3c.Inject(ctx, c)
	if len(c) == 0 {
		return
	}
	if msg.Header == nil {
		msg.Header = nats.Header{}
	}
	for k, v := range c {
		msg.Header.Set(k, v)
	}
}

// Call describes an Admin API call on its span: the method as registered (or
// "_unknown"), and the source and destination qubes as the client named them.
func Call(span trace.Span, method, source, dest string) {
	if !span.IsRecording() {
		return
	}
	span.SetAttributes(AttrMethod.String(method), AttrSource.String(source), AttrDest.String(dest))
}

// Outcome records how a call ended: ok, exception (with its class) or abort (the
// client gets no answer: the span's status is an error).
func Outcome(span trace.Span, outcome, exception string) {
	if !span.IsRecording() {
		return
	}
	span.SetAttributes(AttrOutcome.String(outcome))
	if exception != "" {
		span.SetAttributes(AttrException.String(exception))
	}
	if outcome == OutcomeAbort {
		span.SetStatus(codes.Error, "aborted")
	}
}

// OutcomeAbort is the outcome of a call its client gets no answer to (audit's
// spelling).
const OutcomeAbort = "abort"

// Fail marks span as failed by err (nothing for a nil err or a span that does not
// record).
func Fail(span trace.Span, err error) {
	if err == nil || !span.IsRecording() {
		return
	}
	span.RecordError(err)
	span.SetStatus(codes.Error, err.Error())
}

// carrier reads and writes NATS headers under exactly the propagator's (lower-case)
// names: nats.Header, unlike http.Header, does not canonicalise keys.
type carrier nats.Header

func (c carrier) Get(key string) string { return nats.Header(c).Get(key) }

func (c carrier) Set(key, value string) { nats.Header(c).Set(key, value) }

func (c carrier) Keys() []string {
	keys := make([]string, 0, len(c))
	for k := range c {
		keys = append(keys, k)
	}
	return keys
}
