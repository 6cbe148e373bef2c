package main

import (
	"context"
	"flag"
	"log/slog"
	"net/http"
	"sync/atomic"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/access"
	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/system"
	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/webview"
)

// httpFlag is --http, on the commands that serve (run, serve, lab).
func httpFlag(fs *flag.FlagSet) *string {
	return fs.String("http", envOr("QUBESBUS_HTTP", ""),
		"serve the web view (/), /healthz, /readyz and /metrics (Prometheus) on this address, e.g. 127.0.0.1:9090; empty: none (QUBESBUS_HTTP)")
}

// natsHTTPFlag is --nats-http, on the commands that may run the embedded server (run,
// lab).
func natsHTTPFlag(fs *flag.FlagSet, addr *string) {
	fs.StringVar(addr, "nats-http", envOr("QUBESBUS_NATS_HTTP", ""),
		"open the embedded NATS server's monitoring endpoint (/varz, /jsz, /connz; for nats-surveyor or prometheus-nats-exporter) on this address, e.g. 127.0.0.1:8222; empty: none (QUBESBUS_NATS_HTTP)")
}

// readiness is what /readyz asks: "starting" until the command has its host(s); and
// the web view at /, which needs the bus too.
type readiness struct {
	checks atomic.Pointer[func(context.Context) []system.Check]
	web    atomic.Pointer[http.Handler]
	// serving: there is an HTTP listener (--http), so a web view to start.
	serving bool
}

// ServeHTTP serves the web view once there is one.
func (r *readiness) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	if h := r.web.Load(); h != nil {
		(*h).ServeHTTP(w, req)
		return
	}
	webview.Unavailable("starting").ServeHTTP(w, req)
}

// startWeb starts the web view once the command has its host(s), as the webview role
// (read-only); connect opens that connection. Without --http it does nothing. A web
// view that cannot start is no reason to stop serving: / says why, and a warning is
// logged.
func (r *readiness) startWeb(ctx context.Context, enabled bool, connect func(ctx context.Context, role, name string) (*nats.Conn, error), log *slog.Logger) {
	if !enabled {
		return
	}
	h := func() http.Handler {
		nc, err := connect(ctx, access.WebView, "qubesbus-webview")
		if err != nil {
			log.Warn("web view unavailable", "err", err)
			return webview.Unavailable("cannot connect as the webview role: " + err.Error())
		}
		v, err := webview.Start(ctx, nc, log)
		if err != nil {
			log.Warn("web view unavailable", "err", err)
			return webview.Unavailable(err.Error())
		}
		return v.Handler()
	}()
	r.web.Store(&h)
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
	r.serving = true
	reg := system.NewRegistry()
	mux := http.NewServeMux()
	ops := system.OpsHandler(reg, r.ready)
	for _, p := range []string{"/healthz", "/readyz", "/metrics"} {
		mux.Handle(p, ops)
	}
	mux.Handle("/", r)
	_, wait, err := system.ServeOps(ctx, addr, mux, log)
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
