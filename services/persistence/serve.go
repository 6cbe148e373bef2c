package persistence

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"
	"go.opentelemetry.io/otel/trace"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/buildinfo"
	"github.com/qubesbus/qubesbus/bus/rpc"
	"github.com/qubesbus/qubesbus/bus/tracing"
	"github.com/qubesbus/qubesbus/schemas/changelog"
	"github.com/qubesbus/qubesbus/schemas/config"
	"github.com/qubesbus/qubesbus/schemas/configstore"
)

// maxConcurrentApplies bounds the apply calls in progress on one instance; beyond it
// the endpoint stops taking requests until one ends.
const maxConcurrentApplies = 256

// Serve recovers the configuration from the change log (creating the QUBES_CONFIG
// stream if needed), keeps following the log, and answers the store API on nc:
// store.snapshot, store.apply and store.metrics, in the queue group every instance of
// every host shares. Close (or svc.Stop and the end of ctx) stops it. After an error
// the Store is unusable: make a New one to try again.
func (s *Store) Serve(ctx context.Context, nc *nats.Conn) (micro.Service, error) {
	s.serveMu.Lock()
	defer s.serveMu.Unlock()
	if s.cancel != nil {
		return nil, errors.New("persistence: Serve called twice")
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, fmt.Errorf("jetstream: %w", err)
	}
	clog, err := changelog.Open(ctx, js, s.cfg.Host, changelog.StreamConfig{Replicas: s.cfg.Replicas})
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	s.clog = clog
	s.mu.Unlock()
	// Recovery resumes where a timed-out read left it: retried while the cluster is
	// slow to answer (a lab's hosts start together).
	if err := bus.RetryJS(ctx, s.log, "recover the configuration", s.recover); err != nil {
		return nil, err
	}
	s.mu.RLock()
	unsaved, next := s.unsaved, s.seq+1
	s.mu.RUnlock()
	if unsaved {
		if err := s.flush.wait(ctx); err != nil {
			return nil, err
		}
	}

	// Only a Serve that succeeds leaves anything for Close to stop.
	life, cancel := context.WithCancel(ctx)
	// This instance's own appends are in its state before the log delivers them.
	stopTail, err := clog.Tail(life, next, s.onTail, changelog.Known(func(seq, _ uint64) bool {
		s.mu.RLock()
		defer s.mu.RUnlock()
		return seq <= s.seq
	}))
	if err != nil {
		cancel()
		return nil, err
	}
	svc, err := s.addService(life, nc)
	if err != nil {
		stopTail()
		cancel()
		return nil, err
	}
	s.cancel, s.stopTail, s.svc = cancel, stopTail, svc
	s.announce.Store(nc)
	go s.saveLoop(life)
	return svc, nil
}

func (s *Store) addService(ctx context.Context, nc *nats.Conn) (micro.Service, error) {
	svc, err := micro.AddService(nc, micro.Config{
		Name: rpc.Persistence.Micro(), Version: buildinfo.Version(),
		Description: "qubesbus configuration store", QueueGroup: rpc.Persistence.Micro(),
		Metadata:     map[string]string{"host": s.cfg.Host.ID()},
		StatsHandler: func(*micro.Endpoint) any { return s.Metrics() },
	})
	if err != nil {
		return nil, fmt.Errorf("add persistence service: %w", err)
	}
	sem := make(chan struct{}, maxConcurrentApplies)
	endpoints := []struct {
		name string
		h    micro.HandlerFunc
	}{
		{configstore.OpSnapshot, func(r micro.Request) {
			_, span := tracing.StartServer(ctx, nats.Header(r.Headers()), spanSnapshot)
			defer span.End()
			// gzip: 10 000 qubes are some 12 MB of JSON, past NATS's payload limit,
			// and compress about twentyfold.
			b, err := gzipJSON(s.view())
			if err != nil {
				_ = r.Error("500", err.Error(), nil)
				return
			}
			if err := r.Respond(b, micro.WithHeaders(micro.Headers{"Content-Encoding": {"gzip"}})); err != nil {
				_ = r.Error("500", "snapshot: "+err.Error(), nil)
			}
		}},
		// micro runs one handler at a time per endpoint: applies wait for the change
		// log and for qubes.xml, so each gets a goroutine; that is also what lets
		// concurrent ChangesConfig calls share one write.
		{configstore.OpApply, func(r micro.Request) {
			sem <- struct{}{}
			if !s.handling(r) {
				<-sem
				return
			}
			d := bus.Detach(nc, r)
			go func() {
				defer func() { <-sem; s.handlers.Done() }()
				s.handleApply(ctx, d)
			}()
		}},
		// flush: qubes.xml holds at least the given revision when it answers, for a
		// caller that needs the file itself up to date (the services' changes leave it
		// to the background writer); concurrent flushes share one write.
		{configstore.OpFlush, func(r micro.Request) {
			if !s.handling(r) {
				return
			}
			d := bus.Detach(nc, r)
			go func() {
				defer s.handlers.Done()
				s.handleFlush(ctx, d)
			}()
		}},
		// sync: the change log holds the revision durably when it answers (the second
		// half of an apply with DeferSync); concurrent syncs share one.
		{configstore.OpSync, func(r micro.Request) {
			if !s.handling(r) {
				return
			}
			d := bus.Detach(nc, r)
			go func() {
				defer s.handlers.Done()
				s.handleSync(ctx, d)
			}()
		}},
		{configstore.OpMetrics, func(r micro.Request) { _ = r.RespondJSON(s.Metrics()) }},
	}
	for _, e := range endpoints {
		subj := s.cfg.Host.Store(e.name)
		if e.name == configstore.OpApply {
			subj = configstore.ApplySubject(s.cfg.Host, "*") // the caller's token
		}
		if err := svc.AddEndpoint(e.name, e.h, micro.WithEndpointSubject(subj)); err != nil {
			_ = svc.Stop()
			return nil, fmt.Errorf("add %s endpoint: %w", e.name, err)
		}
	}
	// A request from another connection right after this must find the subscriptions.
	if err := nc.FlushTimeout(10 * time.Second); err != nil {
		_ = svc.Stop()
		return nil, fmt.Errorf("flush: %w", err)
	}
	return svc, nil
}

// handling counts a call in progress for stopServing to wait for, or answers it
// unavailable once the store is stopping.
func (s *Store) handling(r micro.Request) bool {
	s.hmu.Lock()
	defer s.hmu.Unlock()
	if s.draining {
		_ = r.RespondJSON(configstore.ReplyFor(0, ErrNotServing))
		return false
	}
	s.handlers.Add(1)
	return true
}

// Names of the server spans of the store API.
const (
	spanSnapshot = "persistence " + configstore.OpSnapshot
	spanApply    = "persistence " + configstore.OpApply
	spanFlush    = "persistence " + configstore.OpFlush
)

func (s *Store) handleApply(ctx context.Context, r micro.Request) {
	ctx, span := tracing.StartServer(ctx, nats.Header(r.Headers()), spanApply)
	defer span.End()
	var m config.Mutation
	if err := json.Unmarshal(r.Data(), &m); err != nil {
		_ = r.RespondJSON(configstore.ApplyReply{Error: err.Error(), Code: configstore.CodeInvalid, Kind: configstore.KindBadOp})
		return
	}
	caller := configstore.CallerOf(r.Subject())
	if err := s.permits(caller, m); err != nil {
		tracing.Fail(span, err)
		_ = r.RespondJSON(configstore.ReplyFor(0, err))
		return
	}
	ctx, cancel := context.WithTimeout(ctx, s.applyTimeout())
	defer cancel()
	rev, err := s.Apply(ctx, m)
	if err != nil {
		s.log.Debug("apply refused", "revision", rev, "err", err)
		tracing.Fail(span, err)
	}
	_ = r.RespondJSON(configstore.ReplyFor(rev, err))
}

// viewQube runs f over the qube with the given id (nil if there is none), under the
// store's read lock. The change is applied later: a check on what it finds holds
// unless the qube changed in between (it then held a moment before).
func (s *Store) viewQube(id string, f func(d *config.Domain)) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	var d *config.Domain
	if s.state != nil {
		d, _ = s.state.Domain(id)
	}
	f(d)
}

// permits holds a caller to what it may change (configstore.Permits). A refusal is a
// service asking for what its own methods never change: a bug or a service taken
// over, worth a warning.
func (s *Store) permits(caller string, m config.Mutation) error {
	err := configstore.Permits(caller, m.Ops, s.viewQube)
	if err != nil {
		s.refused.Add(1)
		s.log.Warn("apply refused: not the caller's to change", "caller", caller, "err", err)
	}
	return err
}

// ApplyLocal applies m for a client in this process (configstore.Local) as the apply
// endpoint does: counted among the calls stopServing waits for, bounded by the same
// timeout, run to the end whatever becomes of the caller, and answered with the reply
// the endpoint would send. ok is false while the store does not serve.
func (s *Store) ApplyLocal(ctx context.Context, caller string, m config.Mutation) (rep configstore.ApplyReply, ok bool) {
	if err := s.permits(caller, m); err != nil {
		return configstore.ReplyFor(0, err), true
	}
	s.hmu.Lock()
	if s.draining {
		s.hmu.Unlock()
		return rep, false
	}
	s.handlers.Add(1)
	s.hmu.Unlock()
	defer s.handlers.Done()
	var span trace.Span
	ctx, span = tracing.Start(context.WithoutCancel(ctx), spanApply, trace.SpanKindServer)
	defer span.End()
	ctx, cancel := context.WithTimeout(ctx, s.applyTimeout())
	defer cancel()
	rev, err := s.Apply(ctx, m)
	if errors.Is(err, configstore.ErrNotServing) {
		return rep, false // not started, or stopped: another instance may serve
	}
	if err != nil {
		s.log.Debug("apply refused", "revision", rev, "err", err)
		tracing.Fail(span, err)
	}
	return configstore.ReplyFor(rev, err), true
}

// stopServing stops the endpoints and the log follower and waits for calls in progress
// until ctx ends; then Apply answers ErrNotServing.
func (s *Store) stopServing(ctx context.Context) error {
	s.serveMu.Lock()
	defer s.serveMu.Unlock()
	if s.cancel == nil || s.closed {
		return nil
	}
	s.closed = true
	s.hmu.Lock()
	s.draining = true // no handler is added once Wait may have started
	s.hmu.Unlock()
	var err error
	if s.svc != nil {
		err = s.svc.Stop()
	}
	done := make(chan struct{})
	go func() {
		s.handlers.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
		err = errors.Join(err, fmt.Errorf("waiting for apply calls: %w", ctx.Err()))
	}
	s.stopTail()
	s.cancel()
	s.mu.Lock()
	s.clog = nil
	s.mu.Unlock()
	return err
}

func gzipJSON(v any) ([]byte, error) {
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	if err := json.NewEncoder(zw).Encode(v); err != nil {
		return nil, err
	}
	if err := zw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func (s *Store) handleFlush(ctx context.Context, r micro.Request) {
	ctx, span := tracing.StartServer(ctx, nats.Header(r.Headers()), spanFlush)
	defer span.End()
	var req configstore.FlushRequest
	if err := json.Unmarshal(r.Data(), &req); err != nil {
		_ = r.RespondJSON(configstore.ApplyReply{Error: err.Error(), Code: configstore.CodeInvalid})
		return
	}
	fctx, cancel := context.WithTimeout(ctx, s.applyTimeout())
	defer cancel()
	// Another instance may have taken the change: wait until this one follows it.
	for s.Revision() < req.Revision {
		if err := bus.Sleep(fctx, 2*time.Millisecond); err != nil {
			_ = r.RespondJSON(configstore.ApplyReply{Error: "revision not reached: " + err.Error(), Code: configstore.CodeNotSaved})
			return
		}
	}
	if err := s.flush.wait(fctx); err != nil {
		tracing.Fail(span, err)
		_ = r.RespondJSON(configstore.ApplyReply{Revision: req.Revision, Error: err.Error(), Code: configstore.CodeNotSaved})
		return
	}
	_ = r.RespondJSON(configstore.ApplyReply{Revision: req.Revision})
}

func (s *Store) handleSync(ctx context.Context, r micro.Request) {
	var req configstore.SyncRequest
	if err := json.Unmarshal(r.Data(), &req); err != nil {
		_ = r.RespondJSON(configstore.ApplyReply{Error: err.Error(), Code: configstore.CodeInvalid})
		return
	}
	sctx, cancel := context.WithTimeout(ctx, s.applyTimeout())
	defer cancel()
	// The revision was appended through this instance or one it follows; a sync here
	// covers it only once this instance holds it.
	if s.Revision() < req.Revision {
		if _, err := s.catchUp(sctx); err != nil || s.Revision() < req.Revision {
			_ = r.RespondJSON(configstore.ApplyReply{Error: fmt.Sprintf("revision %d not reached: %v", req.Revision, err), Code: configstore.CodeNotSaved})
			return
		}
	}
	if err := s.SyncThrough(sctx, req.Revision); err != nil {
		_ = r.RespondJSON(configstore.ApplyReply{Revision: req.Revision, Error: err.Error(), Code: configstore.CodeNotSaved})
		return
	}
	_ = r.RespondJSON(configstore.ApplyReply{Revision: req.Revision})
}

// catchUp reads the records this instance has not seen yet.
func (s *Store) catchUp(ctx context.Context) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.clog == nil {
		return 0, ErrNotServing
	}
	return s.catchUpLocked(ctx)
}

func (s *Store) applyTimeout() time.Duration {
	if s.cfg.ApplyTimeout == 0 {
		return 30 * time.Second
	}
	return s.cfg.ApplyTimeout
}
