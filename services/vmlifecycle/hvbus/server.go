package hvbus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/buildinfo"
	"github.com/qubesbus/qubesbus/bus/rpc"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"
	"github.com/nats-io/nuid"

	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/schemas/hostdev"
	"github.com/qubesbus/qubesbus/services/vmlifecycle"
)

// call is one Driver method behind an endpoint; the result is the reply body (nil:
// empty body).
type call func(ctx context.Context, d vmlifecycle.Driver, a callArgs) (any, error)

// methods is the endpoint table: one line per Driver method (Watch excepted: notices
// go through JetStream).
var methods = []struct {
	op   string
	call call
}{
	{OpDomains, func(ctx context.Context, d vmlifecycle.Driver, _ callArgs) (any, error) { return d.Domains(ctx) }},
	{OpDomain, func(ctx context.Context, d vmlifecycle.Driver, a callArgs) (any, error) {
		dom, ok, err := d.Domain(ctx, a.Name)
		return domainReply{Domain: dom, Found: ok}, err
	}},
	{OpReserveMemory, func(ctx context.Context, d vmlifecycle.Driver, a callArgs) (any, error) {
		return nil, d.ReserveMemory(ctx, a.Name, a.MiB)
	}},
	{OpReleaseMemory, func(ctx context.Context, d vmlifecycle.Driver, a callArgs) (any, error) {
		return nil, d.ReleaseMemory(ctx, a.Name)
	}},
	{OpCreate, func(ctx context.Context, d vmlifecycle.Driver, a callArgs) (any, error) {
		if a.Spec == nil {
			return nil, errBadRequest{errors.New("create needs a spec")}
		}
		return d.Create(ctx, a.Spec.spec())
	}},
	{OpUnpause, nameOnly(vmlifecycle.Driver.Unpause)},
	{OpPause, nameOnly(vmlifecycle.Driver.Pause)},
	{OpShutdown, nameOnly(vmlifecycle.Driver.Shutdown)},
	{OpDestroy, nameOnly(vmlifecycle.Driver.Destroy)},
	{OpSuspend, nameOnly(vmlifecycle.Driver.Suspend)},
	{OpConsole, func(ctx context.Context, d vmlifecycle.Driver, a callArgs) (any, error) {
		return d.Console(ctx, a.Name)
	}},
	{OpWakeup, nameOnly(vmlifecycle.Driver.Wakeup)},
	{OpWaitAgent, func(ctx context.Context, d vmlifecycle.Driver, a callArgs) (any, error) {
		return nil, d.WaitAgent(ctx, a.Name, a.XID)
	}},
}

// deviceMethods are the endpoints of a driver that also simulates host devices
// (DeviceDriver); the operations are hostdev's.
var deviceMethods = []struct {
	op   string
	call func(ctx context.Context, d DeviceDriver, a callArgs) (any, error)
}{
	{OpDevices, func(ctx context.Context, d DeviceDriver, _ callArgs) (any, error) { return d.Devices(ctx) }},
	{OpAttachDevice, func(ctx context.Context, d DeviceDriver, a callArgs) (any, error) {
		if a.Attach == nil {
			return nil, errBadRequest{errors.New("attach needs an attachment")}
		}
		return nil, d.AttachDevice(ctx, *a.Attach)
	}},
	{OpDetachDevice, func(ctx context.Context, d DeviceDriver, a callArgs) (any, error) {
		if a.Attach == nil {
			return nil, errBadRequest{errors.New("detach needs an attachment")}
		}
		return nil, d.DetachDevice(ctx, *a.Attach)
	}},
}

func nameOnly(f func(vmlifecycle.Driver, context.Context, string) error) call {
	return func(ctx context.Context, d vmlifecycle.Driver, a callArgs) (any, error) {
		return nil, f(d, ctx, a.Name)
	}
}

// errBadRequest marks a request the server could not understand.
type errBadRequest struct{ err error }

func (e errBadRequest) Error() string { return "bad request: " + e.err.Error() }
func (e errBadRequest) Unwrap() error { return e.err }

// Config of the hypervisor service.
type Config struct {
	Host   subject.Host
	Driver vmlifecycle.Driver
	// Devices, if set, answers the device operations (hostdev), and DeviceChanges
	// reports the hot-plugs announced on subject.Host.HypervisorDevices: the
	// simulated hypervisor is all three.
	Devices       DeviceDriver
	DeviceChanges DeviceChangeNotifier
	Log           *slog.Logger // nil: discard
}

// Server is the hypervisor service of one host.
type Server struct{ cfg Config }

// New checks the configuration; Serve starts the service.
func New(cfg Config) (*Server, error) {
	var errs []error
	if cfg.Host.ID() == "" {
		errs = append(errs, errors.New("no host"))
	}
	if cfg.Driver == nil {
		errs = append(errs, errors.New("no driver"))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("hypervisor config: %w", err)
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	return &Server{cfg: cfg}, nil
}

// Serve answers the Driver calls of a host on nc, one goroutine per call, and publishes
// drv's notices to the host's notice subject in NoticeStream (see EnsureNoticeStream),
// until ctx ends or the returned service is stopped.
//
// Notices are watched before the first call is answered, so none caused by a call is
// missed; those not yet stored when Serve stops are lost (the lifecycle service reads
// the domains back with Domains anyway).
func (srv *Server) Serve(ctx context.Context, nc *nats.Conn) (micro.Service, error) {
	host, drv := srv.cfg.Host, srv.cfg.Driver
	log := srv.cfg.Log.With("service", string(rpc.Hypervisor), "host", host.ID())
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, fmt.Errorf("jetstream: %w", err)
	}
	ctx, stop := context.WithCancel(ctx)
	notices, err := drv.Watch(ctx)
	if err != nil {
		stop()
		return nil, fmt.Errorf("watch hypervisor: %w", err)
	}
	s := &server{ctx: ctx, drv: drv, log: log, calls: map[string]context.CancelFunc{}}
	svc, err := micro.AddService(nc, micro.Config{
		Name: rpc.Hypervisor.Micro(), Version: buildinfo.Version(), QueueGroup: rpc.Hypervisor.Micro(),
		Description: "hypervisor driver of one host",
		Metadata:    map[string]string{"host": host.ID()},
		// A stopped service ends the calls in flight and the notice pump.
		DoneHandler: func(micro.Service) { stop() },
		ErrorHandler: func(_ micro.Service, e *micro.NATSError) {
			log.Warn("service error", "subject", e.Subject, "err", e.Description)
		},
	})
	if err != nil {
		stop()
		return nil, fmt.Errorf("add hypervisor service: %w", err)
	}
	fail := func(err error) (micro.Service, error) {
		stop()
		_ = svc.Stop()
		return nil, err
	}
	// Not in the queue group: a cancel must reach whichever server holds the call.
	cancelSub, err := nc.Subscribe(host.Hypervisor(OpCancel), func(m *nats.Msg) { s.cancel(string(m.Data)) })
	if err != nil {
		return fail(fmt.Errorf("subscribe to cancels: %w", err))
	}
	context.AfterFunc(ctx, func() {
		_ = svc.Stop()
		_ = cancelSub.Unsubscribe()
	})
	for _, m := range methods {
		err := svc.AddEndpoint(m.op, micro.HandlerFunc(func(r micro.Request) { s.handle(bus.Detach(nc, r), m.op, m.call) }),
			micro.WithEndpointSubject(host.Hypervisor(m.op)))
		if err != nil {
			return fail(fmt.Errorf("add hypervisor endpoint %s: %w", m.op, err))
		}
	}
	if dd := srv.cfg.Devices; dd != nil {
		for _, m := range deviceMethods {
			f := func(ctx context.Context, _ vmlifecycle.Driver, a callArgs) (any, error) { return m.call(ctx, dd, a) }
			err := svc.AddEndpoint(m.op, micro.HandlerFunc(func(r micro.Request) { s.handle(bus.Detach(nc, r), m.op, f) }),
				micro.WithEndpointSubject(host.Hypervisor(m.op)))
			if err != nil {
				return fail(fmt.Errorf("add hypervisor endpoint %s: %w", m.op, err))
			}
		}
	}
	if dn := srv.cfg.DeviceChanges; dn != nil {
		dn.OnDeviceChange(func(backend string) {
			if ctx.Err() != nil {
				return
			}
			data, _ := json.Marshal(hostdev.Change{Backend: backend})
			if err := nc.Publish(host.HypervisorDevices(), data); err != nil {
				log.Warn("announce device change", "backend", backend, "err", err)
			}
		})
	}
	if err := nc.FlushTimeout(10 * time.Second); err != nil {
		return fail(fmt.Errorf("flush: %w", err))
	}
	go s.pump(ctx, js, host.HypervisorNotices(), notices)
	return svc, nil
}

type server struct {
	ctx context.Context // ends when the service stops
	drv vmlifecycle.Driver
	log *slog.Logger

	mu    sync.Mutex
	calls map[string]context.CancelFunc // by call id, while in flight
	epoch uint64                        // latest lease term heard from
}

// fenced records the caller's term and reports whether op must be refused because a
// later term has been heard from. Calls without a term (no election) are never fenced.
func (s *server) fenced(op string, epoch uint64) bool {
	if epoch == 0 {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if epoch > s.epoch {
		s.epoch = epoch
	}
	return epoch < s.epoch && !reads[op]
}

// handle starts a call on its own goroutine: micro runs handlers one at a time per
// endpoint, and WaitAgent blocks until a guest boots.
func (s *server) handle(r micro.Request, op string, f call) {
	budget := DefaultTimeout
	if v := r.Headers().Get(headerTimeout); v != "" {
		ms, err := strconv.ParseInt(v, 10, 64)
		if err != nil || ms < 0 {
			s.respondErr(r, op, errBadRequest{fmt.Errorf("%s %q", headerTimeout, v)})
			return
		}
		budget = time.Duration(ms) * time.Millisecond
	}
	var epoch uint64
	if v := r.Headers().Get(headerEpoch); v != "" {
		e, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			s.respondErr(r, op, errBadRequest{fmt.Errorf("%s %q", headerEpoch, v)})
			return
		}
		epoch = e
	}
	if s.fenced(op, epoch) {
		s.respondErr(r, op, ErrFenced)
		return
	}
	ctx, cancel := context.WithTimeout(s.ctx, budget)
	// Registered before the goroutine starts, to narrow the window in which a cancel
	// overtakes its call (the call then ends with its budget).
	id := r.Headers().Get(headerCallID)
	tracked := s.track(id, cancel)
	go func() {
		defer cancel()
		if tracked {
			defer s.untrack(id)
		}
		var a callArgs
		if data := r.Data(); len(data) > 0 {
			if err := json.Unmarshal(data, &a); err != nil {
				s.respondErr(r, op, errBadRequest{err})
				return
			}
		}
		start := time.Now()
		res, err := f(ctx, s.drv, a)
		s.log.Debug("call", "op", op, "vm", a.Name, "dur", time.Since(start), "err", err)
		if err != nil {
			s.respondErr(r, op, err)
			return
		}
		if res == nil {
			err = r.Respond(nil)
		} else {
			err = r.RespondJSON(res)
		}
		if err != nil {
			s.log.Warn("respond", "op", op, "err", err)
		}
	}()
}

func (s *server) track(id string, cancel context.CancelFunc) bool {
	if id == "" {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, dup := s.calls[id]; dup {
		return false
	}
	s.calls[id] = cancel
	return true
}

func (s *server) untrack(id string) {
	s.mu.Lock()
	delete(s.calls, id)
	s.mu.Unlock()
}

func (s *server) cancel(id string) {
	s.mu.Lock()
	cancel := s.calls[id]
	s.mu.Unlock()
	if cancel != nil {
		cancel()
	}
}

func (s *server) respondErr(r micro.Request, op string, err error) {
	code := CodeFailed
	var bad errBadRequest
	switch {
	case errors.As(err, &bad):
		code = CodeBadRequest
	case s.ctx.Err() != nil && (errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)):
		code = CodeUnavailable
	default:
		if c := hostdev.Codes.Code(err); c != "" {
			code = c
		} else if c := sentinels.Code(err); c != "" {
			code = c
		}
	}
	// The full text goes in the body: header values cannot hold line breaks.
	msg := err.Error()
	desc := strings.Map(func(r rune) rune {
		if r == '\r' || r == '\n' {
			return ' '
		}
		return r
	}, msg)
	if rerr := r.Error(code, desc, []byte(msg)); rerr != nil {
		s.log.Warn("respond", "op", op, "err", rerr)
	}
}

// pump publishes notices one at a time, each acked by JetStream before the next, so
// they are stored in the order the driver reported them.
func (s *server) pump(ctx context.Context, js jetstream.JetStream, subj string, notices <-chan vmlifecycle.Notice) {
	for n := range notices {
		if err := publish(ctx, js, subj, n, s.log); err != nil {
			s.log.Error("notice lost", "kind", n.Kind, "vm", n.Name, "xid", n.XID, "err", err)
		}
	}
}

// publish stores a notice, retrying with backoff until ctx ends. The message id stays
// the same across attempts, so a retry after a lost ack is not stored twice.
func publish(ctx context.Context, js jetstream.JetStream, subj string, n vmlifecycle.Notice, log *slog.Logger) error {
	data, err := json.Marshal(n)
	if err != nil {
		return err
	}
	id := nuid.Next()
	backoff := bus.Backoff{Next: 100 * time.Millisecond, Max: 5 * time.Second}
	for attempt := 1; ; attempt++ {
		pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := js.Publish(pctx, subj, data, jetstream.WithMsgID(id), jetstream.WithExpectStream(NoticeStream))
		cancel()
		if err == nil {
			return nil
		}
		log.Warn("publish notice", "kind", n.Kind, "vm", n.Name, "xid", n.XID, "attempt", attempt, "err", err)
		if werr := backoff.Wait(ctx); werr != nil {
			return fmt.Errorf("publish notice: %w (last attempt: %w)", werr, err)
		}
	}
}

// ErrStreamConflict is returned by EnsureNoticeStream when NoticeStream exists but cannot
// hold the notices as hvbus needs them.
var ErrStreamConflict = errors.New("notice stream exists with an incompatible configuration")

// EnsureNoticeStream creates NoticeStream if it is missing. An existing stream is left
// alone (its age, storage and replicas may have been tuned) unless it does not take
// every host's notices or does not keep them by limits, which is an error.
func EnsureNoticeStream(ctx context.Context, js jetstream.JetStream, replicas int) error {
	cfg := jetstream.StreamConfig{
		Name:        NoticeStream,
		Description: "hypervisor notices of every host (qubesbus hvbus)",
		Subjects:    []string{subject.AllHypervisorNotices()},
		Retention:   jetstream.LimitsPolicy,
		Storage:     jetstream.FileStorage,
		MaxAge:      24 * time.Hour,
		Discard:     jetstream.DiscardOld,
		Replicas:    replicas,
	}
	err := bus.RetryJS(ctx, nil, "stream "+NoticeStream, func(ctx context.Context) error {
		_, err := js.CreateStream(ctx, cfg)
		return err
	})
	if err == nil {
		return nil
	}
	if !errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
		return fmt.Errorf("create stream %s: %w", NoticeStream, err)
	}
	st, err := js.Stream(ctx, NoticeStream)
	if err != nil {
		return fmt.Errorf("stream %s: %w", NoticeStream, err)
	}
	have := st.CachedInfo().Config
	if !slices.Contains(have.Subjects, subject.AllHypervisorNotices()) || have.Retention != jetstream.LimitsPolicy {
		return fmt.Errorf("%w: %s has subjects %v and %s retention, want %s and limits",
			ErrStreamConflict, NoticeStream, have.Subjects, have.Retention, subject.AllHypervisorNotices())
	}
	return nil
}
