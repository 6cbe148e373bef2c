package rpc

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
	"go.opentelemetry.io/otel/trace"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/buildinfo"
	"github.com/qubesbus/qubesbus/bus/envelope"
	"github.com/qubesbus/qubesbus/bus/qerr"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/bus/tracing"
)

// Handler serves one checked call. It returns the OK content, or an error: a
// *qerr.Error becomes an exception frame, anything else (qerr.ErrAbort included) an
// aborted connection with no response, as an unhandled exception does in qubesd.
type Handler func(ctx context.Context, c *Call) ([]byte, error)

// Mux is the service side of the registry for one service: it serves every method the
// service owns as a NATS micro endpoint, runs the pre-handler checks, and dispatches to
// the handler registered for the method.
type Mux struct {
	reg      *Registry
	service  Service
	resolver Replica
	log      *slog.Logger
	handlers map[string]Handler
	unknown  bool

	// Auth, if set, decides which source may call what (see package policy).
	Auth Authorizer

	// AfterChange, if set, runs after every successful call of a ChangesConfig method,
	// before the reply is sent (persistence saves qubes.xml after such calls).
	AfterChange func(ctx context.Context, c *Call) error

	// RuntimeMark, if set, stamps every reply with the service's runtime mark.
	RuntimeMark func() envelope.RuntimeMark

	// Local, if set, lets a caller in this process (the gateway) reach this mux
	// without NATS while it serves (see Local).
	Local *Local

	// BarrierWait bounds how long a call waits for the resolver's replica to reach the
	// caller's configuration revision (default 10 s).
	BarrierWait time.Duration

	mu       sync.Mutex
	inflight map[string]context.CancelFunc // cancellable calls by the token of their request id
	workers  *workers                      // the goroutines calls run on
}

// Replica is what a mux serves from: a Resolver over a replica of the configuration
// (replica.Replica), which says the revision it holds and waits for a later one.
type Replica interface {
	Resolver
	Revision() uint64
	WaitRevision(ctx context.Context, rev uint64) error
}

// NewMux returns a mux for the methods that svc owns in reg, served from res.
func NewMux(reg *Registry, svc Service, res Replica, log *slog.Logger) *Mux {
	return &Mux{reg: reg, service: svc, resolver: res, log: log,
		handlers: map[string]Handler{}, inflight: map[string]context.CancelFunc{}, workers: newWorkers()}
}

// Handle registers the handler of a method. It panics if the method is not in the
// registry, is owned by another service, or already has a handler.
func (m *Mux) Handle(method string, h Handler) {
	meth, ok := m.reg.Lookup(method)
	switch {
	case !ok:
		panic(fmt.Sprintf("rpc: Handle(%q): no such method in the registry", method))
	case meth.Service != m.service:
		panic(fmt.Sprintf("rpc: Handle(%q): owned by %s, not %s", method, meth.Service, m.service))
	case m.handlers[method] != nil:
		panic(fmt.Sprintf("rpc: Handle(%q): registered twice", method))
	case h == nil:
		panic(fmt.Sprintf("rpc: Handle(%q): nil handler", method))
	}
	m.handlers[method] = h
}

// HandleUnknown makes this mux answer calls of unregistered methods: after resolving
// source and destination (whose errors win, as in qubesd) it answers "no such method".
// It also runs the checks of the streams the gateway serves itself (admin.Events),
// answering the resolved destination. Exactly one service of a host should do this.
func (m *Mux) HandleUnknown() { m.unknown = true }

// Serve adds a micro service on nc with one endpoint per owned method, in the queue
// group of the service, and returns it once the server has every subscription. Its
// version is the build's (bus/buildinfo).
func (m *Mux) Serve(ctx context.Context, nc *nats.Conn, host subject.Host) (micro.Service, error) {
	svc, err := micro.AddService(nc, micro.Config{
		Name:        m.service.Micro(),
		Version:     buildinfo.Version(),
		Description: "qubesbus " + string(m.service) + " service",
		QueueGroup:  m.service.Micro(),
		Metadata:    map[string]string{"host": host.ID()},
	})
	if err != nil {
		return nil, fmt.Errorf("add micro service %s: %w", m.service, err)
	}
	// Every owned method, and (for the resolving service) the streams the gateway
	// serves itself, which still pass the checks here first.
	methods := m.reg.Owned(m.service)
	if m.unknown {
		methods = append(methods, m.reg.Owned(Gateway)...)
	}
	for _, meth := range methods {
		err := svc.AddEndpoint(endpointName(meth.Name), m.endpoint(ctx, nc, &meth),
			micro.WithEndpointSubject(host.API(meth.Name)), micro.WithEndpointMetadata(metadata(meth)))
		if err != nil {
			_ = svc.Stop()
			return nil, fmt.Errorf("add endpoint %s: %w", meth.Name, err)
		}
	}
	if m.unknown {
		err := svc.AddEndpoint(subject.UnknownMethod, m.endpoint(ctx, nc, nil), micro.WithEndpointSubject(host.API(subject.UnknownMethod)))
		if err != nil {
			_ = svc.Stop()
			return nil, fmt.Errorf("add unknown-method endpoint: %w", err)
		}
	}
	// Cancel notices go to every instance: whichever runs the call cancels it.
	sub, err := nc.Subscribe(host.CancelAll(), m.cancel)
	if err != nil {
		_ = svc.Stop()
		return nil, fmt.Errorf("subscribe cancel: %w", err)
	}
	context.AfterFunc(ctx, func() { _ = sub.Unsubscribe() })
	// A request right after start from another connection would see "no responders"
	// until the subscriptions reach the server.
	if err := nc.FlushTimeout(10 * time.Second); err != nil {
		_ = svc.Stop()
		return nil, fmt.Errorf("flush subscriptions: %w", err)
	}
	if m.Local != nil {
		m.Local.add(&served{mux: m, ctx: ctx, nc: nc, svc: svc})
	}
	return svc, nil
}

func (m *Mux) endpoint(ctx context.Context, nc *nats.Conn, meth *Method) micro.HandlerFunc {
	return func(r micro.Request) {
		// micro runs one handler at a time per endpoint; calls may block (a shutdown
		// waiting for Halted), so each runs on a goroutine of its own while it runs.
		r = bus.Detach(nc, r)
		m.workers.run(func() { m.serve(ctx, meth, r) })
	}
}

func (m *Mux) serve(ctx context.Context, meth *Method, r micro.Request) {
	// The span is named "properties admin.vm.property.Set"; the name is made only
	// while tracing is on.
	method, spanName := subject.UnknownMethod, ""
	if meth != nil {
		method = meth.Name
	}
	if tracing.On() {
		spanName = string(m.service) + " " + method
	}
	ctx, span := tracing.StartServer(ctx, nats.Header(r.Headers()), spanName)
	defer span.End()
	req, err := envelope.ParseRequest(nats.Header(r.Headers()), r.Data())
	if err != nil {
		m.log.Warn("malformed request envelope", "err", err)
		m.respond(ctx, r, nil, nil, qerr.Abort("malformed envelope"))
		return
	}
	tracing.Call(span, method, req.Source, req.Dest)
	out, err := m.dispatch(ctx, meth, req)
	m.respond(ctx, r, req, out, err)
}

// dispatch runs a call: the barrier, the checks and the handler. ctx is the service's
// (a cancellable call's is cancelled by a cancel notice).
func (m *Mux) dispatch(ctx context.Context, meth *Method, req *envelope.Request) ([]byte, error) {
	if meth == nil || !meth.Cancellable {
		// Only cancellable calls end early. Any other runs to completion, as in qubesd,
		// also when this instance stops serving meanwhile (a lifecycle term ending):
		// its caller is still waiting for the answer.
		ctx = context.WithoutCancel(ctx)
	}
	if meth != nil && meth.Cancellable && req.ID != "" {
		// Keyed by the id's token in the cancel subject (subject.Host.Cancel), which
		// is what a cancel notice carries: an id too long to read back still matches.
		key := subject.Token(req.ID)
		var cancel context.CancelFunc
		ctx, cancel = context.WithCancel(ctx)
		m.mu.Lock()
		m.inflight[key] = cancel
		m.mu.Unlock()
		defer func() {
			m.mu.Lock()
			delete(m.inflight, key)
			m.mu.Unlock()
			cancel()
		}()
	}
	if err := m.barrier(ctx, meth, req.After.ConfigRev); err != nil {
		return nil, err
	}
	call, err := Check(ctx, m.resolver, m.Auth, meth, req)
	if err != nil {
		return nil, err
	}
	h := m.handlers[call.Method.Name]
	if call.Method.Service == Gateway {
		h = checkOnly
	}
	if h == nil {
		return nil, qerr.NotImplementedError("method not implemented by qubesbus yet: " + call.Method.Name)
	}
	out, err := h(ctx, call)
	if err == nil && call.Method.ChangesConfig && m.AfterChange != nil {
		if aerr := m.AfterChange(ctx, call); aerr != nil {
			m.log.Error("after config change", "method", call.Method.Name, "dest", call.Dest.Name, "id", call.ID, "err", aerr)
		}
	}
	return out, err
}

func (m *Mux) respond(ctx context.Context, r micro.Request, req *envelope.Request, content []byte, err error) {
	var h nats.Header
	var body []byte
	if err == nil {
		h, body = envelope.OK(content)
	} else {
		h, body = envelope.Failure(err)
		m.logAbort(req, err)
	}
	if tracing.On() {
		traceOutcome(trace.SpanFromContext(ctx), h, err)
	}
	m.marks().Set(h)
	if rerr := r.Respond(body, micro.WithHeaders(micro.Headers(h))); rerr != nil {
		m.log.Warn("respond", "err", rerr)
	}
}

// traceOutcome records on the call's span how it ended, as its reply says.
func traceOutcome(span trace.Span, h nats.Header, err error) {
	status := h.Get(envelope.HeaderStatus)
	tracing.Outcome(span, status, h.Get(envelope.HeaderException))
	if status != envelope.StatusOK && status != envelope.StatusException {
		tracing.Fail(span, err)
	}
}

// barrier waits until the resolver's replica holds the configuration revision the
// caller has already seen, so that a call after a change served by another instance
// sees that change. A read waits briefly and then answers StatusBehind, which the
// gateway sends again (perhaps to another instance): a replica can lag for seconds
// after a node loss. A change waits longer and then aborts.
func (m *Mux) barrier(ctx context.Context, meth *Method, rev uint64) error {
	if rev == 0 || m.resolver.Revision() >= rev {
		return nil
	}
	read := meth == nil || meth.IsRead()
	wait := m.BarrierWait
	if wait <= 0 {
		wait = 10 * time.Second
	}
	if read {
		wait = min(wait, readBarrierWait)
	}
	wctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	if err := m.resolver.WaitRevision(wctx, rev); err != nil {
		if read {
			return fmt.Errorf("%w: configuration replica behind the caller's revision %d: %w", envelope.ErrBehind, rev, err)
		}
		return fmt.Errorf("%w: configuration replica behind the caller's revision %d: %w", qerr.ErrAbort, rev, err)
	}
	return nil
}

// readBarrierWait is how long a read waits for its replica before answering
// StatusBehind; shorter than the gateway's first attempt (1 s).
const readBarrierWait = 500 * time.Millisecond

// logAbort logs a call that ends without a response.
func (m *Mux) logAbort(req *envelope.Request, err error) {
	var qe *qerr.Error
	if req != nil && (errors.Is(err, qerr.ErrAbort) || !errors.As(err, &qe)) {
		m.log.Warn("call aborted", "method", req.Method, "src", req.Source, "dest", req.Dest, "id", req.ID, "err", err)
	}
}

// marks are this instance's marks, which every reply carries.
func (m *Mux) marks() envelope.Marks {
	var marks envelope.Marks
	marks.ConfigRev = m.resolver.Revision()
	if m.RuntimeMark != nil {
		marks.Runtime = m.RuntimeMark()
	}
	return marks
}

func (m *Mux) cancel(msg *nats.Msg) {
	tok := msg.Subject[strings.LastIndexByte(msg.Subject, '.')+1:]
	m.mu.Lock()
	cancel := m.inflight[tok]
	m.mu.Unlock()
	if cancel != nil {
		cancel()
	}
}

// checkOnly answers a gateway-owned method whose checks passed with the resolved
// destination, "name class", so the gateway knows what to stream.
func checkOnly(_ context.Context, c *Call) ([]byte, error) {
	return []byte(c.Dest.Name + " " + c.Dest.Class), nil
}

// endpointName turns a method name into a micro endpoint name (letters, digits, - and _).
func endpointName(method string) string { return strings.ReplaceAll(method, ".", "_") }

// metadata publishes a method's options with its endpoint, for discovery.
func metadata(m Method) map[string]string {
	return map[string]string{
		"method":         m.Name,
		"arg":            m.Arg.String(),
		"payload":        m.Payload.String(),
		"dest":           m.Dest.String(),
		"cancellable":    strconv.FormatBool(m.Cancellable),
		"changes_config": strconv.FormatBool(m.ChangesConfig),
		"access":         m.Access.String(),
	}
}
