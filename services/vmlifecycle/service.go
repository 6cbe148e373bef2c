// Package vmlifecycle owns the power state of qubes and serves the Admin API power
// methods over a hypervisor driver.
package vmlifecycle

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/qubesbus/qubesbus/bus/rpc"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/services/persistence/replica"
)

// Service is the lifecycle service of one host.
type Service struct {
	host  subject.Host
	model *replica.Replica
	log   *slog.Logger
	mux   *rpc.Mux

	mu     sync.RWMutex
	states map[string]string // qube name → power state, for qubes not Halted
}

// New returns the service; dom0 is always Running.
func New(host subject.Host, reg *rpc.Registry, model *replica.Replica, log *slog.Logger) *Service {
	s := &Service{host: host, model: model, log: log, states: map[string]string{"dom0": "Running"}}
	s.mux = rpc.NewMux(reg, rpc.VMLifecycle, model, log)
	return s
}

// PowerStates returns the power state of every qube that is not Halted.
func (s *Service) PowerStates(context.Context) (map[string]string, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make(map[string]string, len(s.states))
	for k, v := range s.states {
		out[k] = v
	}
	return out, nil
}

// Serve starts the Admin API endpoints and the internal states endpoint on nc.
func (s *Service) Serve(ctx context.Context, nc *nats.Conn, version string) (micro.Service, error) {
	svc, err := s.mux.Serve(ctx, nc, s.host, version)
	if err != nil {
		return nil, err
	}
	err = svc.AddEndpoint("states", micro.HandlerFunc(func(r micro.Request) {
		st, _ := s.PowerStates(ctx)
		b, _ := json.Marshal(st)
		_ = r.Respond(b)
	}), micro.WithEndpointSubject(s.host.Service("vmlifecycle", "states")))
	if err != nil {
		_ = svc.Stop()
		return nil, fmt.Errorf("add states endpoint: %w", err)
	}
	if err := nc.FlushTimeout(10 * time.Second); err != nil {
		_ = svc.Stop()
		return nil, fmt.Errorf("flush: %w", err)
	}
	return svc, nil
}

// StatesClient asks a host's lifecycle service for power states over NATS.
type StatesClient struct {
	NC   *nats.Conn
	Host subject.Host
}

// PowerStates implements the properties service's PowerStates.
func (c StatesClient) PowerStates(ctx context.Context) (map[string]string, error) {
	msg, err := c.NC.RequestWithContext(ctx, c.Host.Service("vmlifecycle", "states"), nil)
	if err != nil {
		return nil, fmt.Errorf("ask vmlifecycle for power states: %w", err)
	}
	var out map[string]string
	if err := json.Unmarshal(msg.Data, &out); err != nil {
		return nil, fmt.Errorf("decode power states: %w", err)
	}
	return out, nil
}
