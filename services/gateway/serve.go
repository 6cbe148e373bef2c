package gateway

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/qubesbus/qubesbus/bus/buildinfo"
	"github.com/qubesbus/qubesbus/bus/rpc"
)

// Serve listens on the socket, relays calls over nc and serves the gateway's own
// streams (admin.Events, admin.vm.Stats) until ctx ends; Wait returns once every call
// has ended. It returns once the socket accepts calls. The returned micro service
// makes the gateway discoverable like every other service ($SRV.PING, INFO, STATS);
// it has no endpoints, since calls arrive on the socket. A Server serves once.
func (s *Server) Serve(ctx context.Context, nc *nats.Conn) (micro.Service, error) {
	if s.nc != nil {
		return nil, errors.New("gateway: Serve called twice")
	}
	s.nc = nc
	if s.cfg.Socket == "" {
		return nil, errors.New("gateway: no socket path")
	}
	if err := os.MkdirAll(filepath.Dir(s.cfg.Socket), 0o755); err != nil {
		return nil, fmt.Errorf("socket dir: %w", err)
	}
	events, err := NewEvents(EventsConfig{WriteTimeout: s.cfg.EventsWriteTimeout, Tap: s.cfg.EventsTap}, nc, s.cfg.Host, s.log)
	if err != nil {
		return nil, err
	}
	stats := NewStats(nc, s.cfg.Host, s.log)
	if s.cfg.EventsWriteTimeout > 0 {
		stats.WriteTimeout = s.cfg.EventsWriteTimeout
	}
	s.events.Store(events)
	s.HandleStream("admin.Events", events.Serve)
	s.HandleStream("admin.vm.Stats", stats.Serve)
	svc, err := micro.AddService(nc, micro.Config{
		Name: rpc.Gateway.Micro(), Version: buildinfo.Version(),
		Description: "qubesd's Unix socket, relayed to the services",
		Metadata:    map[string]string{"host": s.cfg.Host.ID(), "socket": s.cfg.Socket},
	})
	if err != nil {
		return nil, fmt.Errorf("add gateway service: %w", err)
	}
	// Discoverable once Serve returns: the server has the service's subscriptions.
	if err := nc.FlushTimeout(10 * time.Second); err != nil {
		_ = svc.Stop()
		return nil, fmt.Errorf("flush: %w", err)
	}
	l, err := Listen(s.cfg.Socket, s.cfg.SocketGroup)
	if err != nil {
		_ = svc.Stop()
		return nil, err
	}
	held, err := holdSocket(s.cfg.Socket)
	if err != nil {
		l.Close()
		_ = svc.Stop()
		return nil, fmt.Errorf("socket: %w", err)
	}
	// One accept loop per listener: a socket deleted while we run is opened again
	// (keepSocket) and served by a new loop, while the old loop's calls go on.
	var loops sync.WaitGroup
	serve := func(l *net.UnixListener) {
		loops.Add(1)
		go func() {
			defer loops.Done()
			if err := s.accept(ctx, l); err != nil {
				s.log.Error("gateway stopped", "err", err)
			}
		}()
	}
	serve(l)
	go func() {
		defer close(s.done)
		keepSocket(ctx, s.cfg.Socket, s.cfg.SocketGroup, l, held, s.log, serve)
		loops.Wait()
	}()
	return svc, nil
}

// Wait returns once Serve's accept loop has ended and every call with it.
func (s *Server) Wait() { <-s.done }
