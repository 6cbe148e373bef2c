package main

import (
	"context"
	"flag"
	"log/slog"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/system"
)

// httpFlag is --http, on the commands that serve (run, serve, lab).
func httpFlag(fs *flag.FlagSet) *string {
	return fs.String("http", envOr("QUBESBUS_HTTP", ""),
		"serve /healthz, /readyz and /metrics (Prometheus) on this address, e.g. 127.0.0.1:9090; empty: none (QUBESBUS_HTTP)")
}

// readiness is what /readyz asks: "starting" until the command has its host(s).
type readiness struct {
	checks atomic.Pointer[func(context.Context) []system.Check]
}

func (r *readiness) set(f func(context.Context) []system.Check) { r.checks.Store(&f) }

func (r *readiness) ready(ctx context.Context) []system.Check {
	if f := r.checks.Load(); f != nil {
		return (*f)(ctx)
	}
	return []system.Check{{Name: "start-up", Detail: "starting"}}
}

// startOps serves the operators' endpoints on addr until ctx ends (nothing for an
// empty addr): it returns the registry the host(s) register their metrics on (nil
// without addr), the readiness to set once they run, and a function that waits for
// the listener to close.
func startOps(ctx context.Context, addr string, log *slog.Logger) (*prometheus.Registry, *readiness, func(), error) {
	r := &readiness{}
	if addr == "" {
		return nil, r, func() {}, nil
	}
	reg := system.NewRegistry()
	_, wait, err := system.ServeOps(ctx, addr, system.OpsHandler(reg, r.ready), log)
	if err != nil {
		return nil, nil, nil, err
	}
	return reg, r, wait, nil
}

// registerer is reg as a prometheus.Registerer, nil when there is none (a nil
// *Registry in the interface would not be nil).
func registerer(reg *prometheus.Registry) prometheus.Registerer {
	if reg == nil {
		return nil
	}
	return reg
}
