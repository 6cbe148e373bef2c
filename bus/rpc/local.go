package rpc

import (
	"context"
	"sync"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
	"go.opentelemetry.io/otel/trace"

	"github.com/qubesbus/qubesbus/bus/envelope"
	"github.com/qubesbus/qubesbus/bus/tracing"
)

// Local reaches the muxes served in this process without a NATS round trip. When the
// gateway and a service run in one process (`qubesbus run`), the gateway hands a read
// to the service's mux directly: the same barrier, checks and handler, over the same
// replica, as for a request that came over NATS, so the answer is the same bytes and
// read-your-writes holds the same way (the caller's marks, Mux.barrier). Only reads
// go this way: a change must reach the instance its retries and cancel notices reach.
//
// A Local is per host: give it to the muxes of one host's services and to that host's
// gateway.
type Local struct {
	mu    sync.RWMutex
	muxes map[Service]*served
}

// served is a mux while its micro service serves.
type served struct {
	mux *Mux
	ctx context.Context
	nc  *nats.Conn
	svc micro.Service
}

// NewLocal returns a Local with no mux.
func NewLocal() *Local { return &Local{muxes: map[Service]*served{}} }

// add makes s the mux of its service until its context ends.
func (l *Local) add(s *served) {
	l.mu.Lock()
	l.muxes[s.mux.service] = s
	l.mu.Unlock()
	context.AfterFunc(s.ctx, func() {
		l.mu.Lock()
		if l.muxes[s.mux.service] == s {
			delete(l.muxes, s.mux.service)
		}
		l.mu.Unlock()
	})
}

// Call serves a read of a method in the registry through the mux of its owner if
// that mux serves in this process; ok is false if none does (or meth is no read), and
// the caller sends the call over NATS instead. The reply carries the instance's marks.
func (l *Local) Call(ctx context.Context, meth *Method, req *envelope.Request) (rep envelope.Reply, ok bool) {
	if meth == nil || !meth.IsRead() || meth.Cancellable || meth.Service == Gateway {
		return envelope.Reply{}, false
	}
	l.mu.RLock()
	s := l.muxes[meth.Service]
	l.mu.RUnlock()
	// A stopped service (or one whose connection is gone) leaves its reads to the
	// instances that still serve.
	if s == nil || s.ctx.Err() != nil || s.nc.IsClosed() || s.svc.Stopped() {
		return envelope.Reply{}, false
	}
	// The service's span, as over NATS ("properties admin.vm.property.Get"), here a
	// child of the gateway's in the same process.
	var spanName string
	if tracing.On() {
		spanName = string(meth.Service) + " " + meth.Name
	}
	ctx, span := tracing.Start(ctx, spanName, trace.SpanKindServer)
	defer span.End()
	tracing.Call(span, meth.Name, req.Source, req.Dest)
	out, err := s.mux.dispatch(ctx, meth, req)
	if err != nil {
		s.mux.logAbort(req, err)
	}
	if span.IsRecording() {
		var h nats.Header
		if err == nil {
			h, _ = envelope.OK(out)
		} else {
			h, _ = envelope.Failure(err)
		}
		traceOutcome(span, h, err)
	}
	rep = envelope.Result(out, err)
	rep.Marks = s.mux.marks()
	return rep, true
}
