package gateway

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nuid"
	"go.opentelemetry.io/otel/trace"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/audit"
	"github.com/qubesbus/qubesbus/bus/cloudevent"
	"github.com/qubesbus/qubesbus/bus/envelope"
	"github.com/qubesbus/qubesbus/bus/qerr"
	"github.com/qubesbus/qubesbus/bus/rpc"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/bus/tracing"
	"github.com/qubesbus/qubesbus/schemas/adminapi"
)

// Config of the gateway.
type Config struct {
	Host     subject.Host
	Registry *rpc.Registry // nil: adminapi.Registry
	Log      *slog.Logger  // nil: discard
	// Socket is the path of the Unix socket (Listen); SocketGroup its group.
	Socket      string
	SocketGroup string
	// EventsWriteTimeout cuts off an admin.Events or admin.vm.Stats subscriber that
	// stops reading (zero: EventsConfig's default).
	EventsWriteTimeout time.Duration
	// IdleTimeout bounds how long a client may take to send its whole request (up to
	// EOF). qubesd waits forever; a bound keeps idle connections from holding resources.
	// Zero means no bound.
	IdleTimeout time.Duration
	// CallTimeout bounds a relayed call (Shutdown with wait may take a qube's
	// shutdown_timeout); zero means 10 minutes.
	CallTimeout time.Duration
	// MaxConns bounds concurrent connections; further ones wait in the listen backlog.
	MaxConns int
	// ReadTimeout bounds the first attempt of a read call (each retry gets twice the
	// time of the one before); RetryWindow is how long a read is retried when no
	// service answered (zero: 1 s and 10 s). A request that reached an instance which
	// then died is lost, so the first attempt must end well inside the window.
	ReadTimeout, RetryWindow time.Duration
	// Audit receives the audit record of every call the audit rule selects
	// (audit.Audited: changes, refused calls, unknown methods) and of every request
	// the gateway refuses itself (unreadable or malformed); nil keeps no trail.
	Audit Auditor
	// Metrics counts every relayed call and its duration (metrics.Metrics); nil
	// counts nothing.
	Metrics CallMetrics
	// Local, if set, answers reads whose service runs in this process without a
	// NATS round trip (rpc.Local); the rest, and reads it cannot serve, go over NATS.
	Local LocalCaller
	// EventsTap hears the events of the services of this process as they are sent, for
	// admin.Events (EventsConfig.Tap); nil relays every event as NATS brings it.
	EventsTap *cloudevent.Tap
}

// LocalCaller serves a read through the mux of its service in this process, if one
// serves here (rpc.Local): the same checks, handler and replica as over NATS, so the
// reply is the same. ok is false when it did not serve the call.
type LocalCaller interface {
	Call(ctx context.Context, m *rpc.Method, req *envelope.Request) (rep envelope.Reply, ok bool)
}

// CallMetrics counts calls: method is a registered method's name, or "" for any
// other; outcome is an audit outcome (ok, exception, abort). It runs on the call's
// path and must not block.
type CallMetrics interface {
	ObserveCall(method, outcome string, d time.Duration)
}

// Auditor takes audit records (audit.Publisher). Record must not block: it runs on
// the call's path, after the reply came back and before the client gets it.
type Auditor interface{ Record(audit.Record) }

// Server is the socket gateway.
type Server struct {
	cfg Config
	nc  *nats.Conn
	reg *rpc.Registry
	log *slog.Logger

	// streams serves methods owned by the gateway itself (admin.Events).
	streams map[string]StreamHandler

	wg    sync.WaitGroup
	slots chan struct{}
	done  chan struct{} // closed when the accept loop has ended and every call with it

	// marks are the newest state any reply has shown. Every request carries them, so
	// a call is never served from state older than what an earlier call saw, whichever
	// service or instance serves it.
	mmu   sync.Mutex
	marks envelope.Marks

	events atomic.Pointer[Events] // admin.Events, once Serve has started it

	// idle hands an accepted connection to a handler goroutine waiting for one
	// (worker). A goroutine that stays keeps the stack its calls grew; a new goroutine
	// per connection grew it again on every read (runtime.copystack in the profile).
	idle chan *net.UnixConn

	// answer produces the reply of a call that is not a stream: relay, or a table of
	// recorded replies (Recorded).
	answer func(ctx context.Context, req *envelope.Request) (envelope.Reply, error)
}

// Subscribers is the number of admin.Events subscribers now.
func (s *Server) Subscribers() int {
	if e := s.events.Load(); e != nil {
		return e.Subscribers()
	}
	return 0
}

// EventsRelayed counts the events relayed to admin.Events subscribers (Events.Relayed).
func (s *Server) EventsRelayed() (tapped, published, stored uint64) {
	if e := s.events.Load(); e != nil {
		return e.Relayed()
	}
	return 0, 0, 0
}

// Marks returns the newest marks the gateway has seen in replies.
func (s *Server) Marks() envelope.Marks {
	s.mmu.Lock()
	defer s.mmu.Unlock()
	return s.marks
}

func (s *Server) observe(m envelope.Marks) {
	s.mmu.Lock()
	s.marks = s.marks.Max(m)
	s.mmu.Unlock()
}

// StreamHandler serves a streaming method on the connection until the client goes
// away or ctx ends. It writes every frame itself; relay sends the call to the services
// (for the checks qubesd runs before the stream starts).
type StreamHandler func(ctx context.Context, conn *net.UnixConn, req *envelope.Request, relay func(*envelope.Request) (envelope.Reply, error))

// New checks the configuration; Serve starts the gateway.
func New(cfg Config) (*Server, error) {
	if cfg.Host.ID() == "" {
		return nil, errors.New("gateway config: no host")
	}
	if cfg.Registry == nil {
		cfg.Registry = adminapi.Registry
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.CallTimeout == 0 {
		cfg.CallTimeout = 10 * time.Minute
	}
	if cfg.ReadTimeout == 0 {
		cfg.ReadTimeout = time.Second
	}
	if cfg.RetryWindow == 0 {
		cfg.RetryWindow = 10 * time.Second
	}
	if cfg.MaxConns == 0 {
		cfg.MaxConns = 4096
	}
	s := &Server{cfg: cfg, reg: cfg.Registry, log: cfg.Log, streams: map[string]StreamHandler{},
		slots: make(chan struct{}, cfg.MaxConns), done: make(chan struct{}), idle: make(chan *net.UnixConn)}
	s.answer = s.relay
	return s, nil
}

// HandleStream registers the gateway's own handler of a streaming method.
func (s *Server) HandleStream(method string, h StreamHandler) { s.streams[method] = h }

// accept accepts connections until ctx ends, then closes the listener and waits for the
// calls in progress.
func (s *Server) accept(ctx context.Context, l *net.UnixListener) error {
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	for {
		select {
		case s.slots <- struct{}{}:
		case <-ctx.Done():
			s.wg.Wait()
			return nil
		}
		c, err := l.AcceptUnix()
		if err != nil {
			<-s.slots
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				s.wg.Wait()
				return nil
			}
			s.log.Error("accept", "err", err)
			// A lasting error (out of file descriptors) must not spin the loop.
			if bus.Sleep(ctx, 10*time.Millisecond) != nil {
				s.wg.Wait()
				return nil
			}
			continue
		}
		s.wg.Add(1)
		select {
		case s.idle <- c:
		default:
			go s.worker(ctx, c)
		}
	}
}

// workerIdle is how long a handler goroutine waits for another connection.
const workerIdle = 2 * time.Second

// worker serves c, then each connection handed to it on idle until none comes for
// workerIdle or ctx ends.
func (s *Server) worker(ctx context.Context, c *net.UnixConn) {
	t := time.NewTimer(workerIdle)
	defer t.Stop()
	for {
		s.handle(ctx, c)
		<-s.slots
		s.wg.Done()
		t.Reset(workerIdle)
		select {
		case c = <-s.idle:
		case <-t.C:
			return
		case <-ctx.Done():
			return
		}
	}
}

func (s *Server) handle(ctx context.Context, c *net.UnixConn) {
	buf, err := s.readRequest(c)
	if err != nil {
		s.log.Warn("bad request", "err", err)
		s.auditRefused(len(buf), err)
		c.Close() // abort: no response
		return
	}
	req, err := DecodeRequest(buf)
	if err != nil {
		s.log.Warn("framing error", "err", err)
		s.auditRefused(len(buf), err)
		c.Close()
		return
	}
	req.ID = nuid.Next()
	if h := s.streams[req.Method]; h != nil {
		h(ctx, c, req, func(r *envelope.Request) (envelope.Reply, error) { return s.call(ctx, r) })
		c.Close()
		return
	}
	rep, err := s.call(ctx, req)
	if err != nil {
		s.log.Error("call failed", "method", req.Method, "id", req.ID, "err", err)
		c.Close()
		return
	}
	writeReply(c, rep, s.log)
}

// call answers a call (a stream's: its checks) and counts, audits and traces it.
func (s *Server) call(ctx context.Context, req *envelope.Request) (envelope.Reply, error) {
	start := time.Now()
	// The span is named by the method as registered: a client's made-up names never
	// become span names. Off, not even the lookup is made.
	var name string
	if tracing.On() {
		name = subject.UnknownMethod
		if meth, ok := s.reg.Lookup(req.Method); ok {
			name = meth.Name
		}
	}
	ctx, span := tracing.Start(ctx, name, trace.SpanKindServer)
	defer span.End()
	tracing.Call(span, name, req.Source, req.Dest)
	rep, err := s.answer(ctx, req)
	s.auditCall(req, rep, err)
	outcome := s.countCall(req, rep, err, start)
	if span.IsRecording() {
		class := ""
		if rep.Exception != nil {
			class = rep.Exception.Class
		}
		tracing.Outcome(span, outcome, class)
		tracing.Fail(span, err)
	}
	return rep, err
}

// auditCall records a relayed call if the audit rule selects it. A call with no reply
// (err) is an abort to its client; for a change it may have been applied all the same.
func (s *Server) auditCall(req *envelope.Request, rep envelope.Reply, err error) {
	if s.cfg.Audit == nil {
		return
	}
	r := audit.Record{Time: time.Now(), Source: req.Source, Method: req.Method, Dest: req.Dest, Arg: req.Arg,
		PayloadLen: len(req.Payload), RequestID: req.ID}
	switch {
	case err != nil:
		r.Outcome, r.Reason = audit.OutcomeAbort, "no reply: "+err.Error()
	case rep.Status == envelope.StatusOK:
		r.Outcome = audit.OutcomeOK
	case rep.Status == envelope.StatusException:
		r.Outcome, r.Exception = audit.OutcomeException, rep.Exception.Class
	default:
		r.Outcome = audit.OutcomeAbort
	}
	var m *rpc.Method
	if meth, ok := s.reg.Lookup(req.Method); ok {
		m = &meth
	}
	if audit.Audited(m, r) {
		s.cfg.Audit.Record(r)
	}
}

// countCall counts a relayed call (a stream's: its checks, not the stream) in the
// metrics, under its method's name if the registry has it, and returns its outcome.
func (s *Server) countCall(req *envelope.Request, rep envelope.Reply, err error, start time.Time) string {
	outcome := audit.OutcomeAbort
	switch {
	case err != nil:
	case rep.Status == envelope.StatusOK:
		outcome = audit.OutcomeOK
	case rep.Status == envelope.StatusException:
		outcome = audit.OutcomeException
	}
	if s.cfg.Metrics == nil {
		return outcome
	}
	method := ""
	if _, ok := s.reg.Lookup(req.Method); ok {
		method = req.Method
	}
	s.cfg.Metrics.ObserveCall(method, outcome, time.Since(start))
	return outcome
}

// auditRefused records a request the gateway dropped before any service saw it (it
// could not be read, or not split into method, source and destination): n bytes of
// it were read, none are recorded. A connection that sent nothing is no call (a
// liveness probe of the socket, such as Listen's) and is not recorded.
func (s *Server) auditRefused(n int, cause error) {
	if s.cfg.Audit == nil || n == 0 {
		return
	}
	s.cfg.Audit.Record(audit.Record{Time: time.Now(), Outcome: audit.OutcomeAbort, PayloadLen: n,
		RequestID: nuid.Next(), Reason: cause.Error()})
}

// relay sends a call to the service that owns its method and returns the reply. A call
// runs to completion even if its client leaves (only streams are cancellable).
//
// A read (a method that neither writes nor executes) whose request found no responder
// or timed out is sent again until RetryWindow has passed: during a failover the
// queue group is briefly empty. A change is never retried, since it may have been
// applied before its reply was lost.
func (s *Server) relay(ctx context.Context, req *envelope.Request) (envelope.Reply, error) {
	tok := subject.UnknownMethod
	retry := true
	meth, known := s.reg.Lookup(req.Method)
	if known {
		tok = meth.Name
		retry = meth.IsRead()
	}
	req.After = req.After.Max(s.Marks())
	if known && s.cfg.Local != nil {
		// A read whose service runs here skips NATS. It runs as the service runs it
		// for a request from NATS: to completion, with no deadline of the caller
		// (the service's own requests and its barrier bound themselves), so no timer
		// is set for it. A replica too far behind the caller (StatusBehind) sends it
		// to the instances on NATS instead.
		if rep, ok := s.cfg.Local.Call(context.WithoutCancel(ctx), &meth, req); ok {
			s.observe(rep.Marks)
			if rep.Status != envelope.StatusBehind {
				return rep, nil
			}
		}
	}
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.cfg.CallTimeout)
	defer cancel()
	deadline := time.Now().Add(s.cfg.RetryWindow)
	backoff := bus.Backoff{Next: 20 * time.Millisecond, Max: 500 * time.Millisecond}
	attemptTimeout := s.cfg.ReadTimeout
	for attempt := 1; ; attempt++ {
		actx, acancel := cctx, context.CancelFunc(func() {})
		if retry {
			actx, acancel = context.WithTimeout(cctx, attemptTimeout)
			attemptTimeout *= 2
		}
		out := req.Msg(s.cfg.Host.API(tok))
		tracing.Inject(ctx, out)
		msg, err := s.nc.RequestMsgWithContext(actx, out)
		acancel()
		if err == nil {
			rep, perr := envelope.ParseReply(msg)
			if perr != nil {
				return rep, perr
			}
			s.observe(rep.Marks)
			if rep.Status != envelope.StatusBehind {
				return rep, nil
			}
			// The instance's replica is behind this caller; nothing was done.
			err = envelope.ErrBehind
		}
		transient := errors.Is(err, nats.ErrNoResponders) || errors.Is(err, context.DeadlineExceeded) ||
			errors.Is(err, nats.ErrTimeout) || errors.Is(err, envelope.ErrBehind)
		if !retry || !transient || cctx.Err() != nil || backoff.Passes(deadline) {
			return envelope.Reply{}, fmt.Errorf("%s after %d attempts: %w", req.Method, attempt, err)
		}
		s.log.Debug("retrying read", "method", req.Method, "id", req.ID, "attempt", attempt, "err", err)
		if werr := backoff.Wait(cctx); werr != nil {
			return envelope.Reply{}, fmt.Errorf("%s after %d attempts: %w (last: %w)", req.Method, attempt, werr, err)
		}
	}
}

// writeReply sends the reply frame and closes. After ProtocolError and
// PermissionDenied qubesd aborts the connection instead of closing it cleanly, which
// the client sees only as the missing half-close before the close.
func writeReply(c *net.UnixConn, rep envelope.Reply, log *slog.Logger) {
	defer c.Close()
	var out []byte
	switch rep.Status {
	case envelope.StatusOK:
		out = AppendOK(make([]byte, 0, 2+len(rep.Content)), rep.Content)
	case envelope.StatusException:
		out = AppendException(nil, rep.Exception.Class, rep.Exception.Message)
	default:
		return
	}
	if _, err := c.Write(out); err != nil {
		log.Debug("client gone before reply", "err", err)
		return
	}
	if rep.Status == envelope.StatusException && qerr.AbortsAfter(rep.Exception.Class) {
		return
	}
	_ = c.CloseWrite()
}

// readRequest reads until EOF, at most MaxRequest bytes, within the idle limit. On an
// error it returns what it read so far (its length goes into the audit record).
func (s *Server) readRequest(c *net.UnixConn) ([]byte, error) {
	if s.cfg.IdleTimeout > 0 {
		if err := c.SetReadDeadline(time.Now().Add(s.cfg.IdleTimeout)); err != nil {
			return nil, err
		}
	}
	buf := make([]byte, 0, 512)
	for {
		if len(buf) == cap(buf) {
			if len(buf) > MaxRequest {
				return buf, errors.New("request too long")
			}
			next := min(2*cap(buf), MaxRequest+1)
			nb := make([]byte, len(buf), next)
			copy(nb, buf)
			buf = nb
		}
		n, err := c.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if len(buf) > MaxRequest {
			return buf, errors.New("request too long")
		}
		if errors.Is(err, io.EOF) {
			_ = c.SetReadDeadline(time.Time{})
			return buf, nil
		}
		if err != nil {
			return buf, fmt.Errorf("read request: %w", err)
		}
	}
}
