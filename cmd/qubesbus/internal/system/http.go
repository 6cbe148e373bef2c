package system

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// NewRegistry is the registry of a process's metrics: qubesbus's and the Go
// runtime's and process's own.
func NewRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg
}

// OpsHandler serves the operators' endpoints:
//
//	/healthz  200 "ok" while the process runs
//	/readyz   200 when every check of ready passes, else 503; one line per check
//	/metrics  the Prometheus text format of g
func OpsHandler(g prometheus.Gatherer, ready func(context.Context) []Check) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		checks := ready(r.Context())
		var b strings.Builder
		ok := len(checks) > 0
		for _, c := range checks {
			mark := "ok  "
			if !c.OK {
				mark, ok = "FAIL", false
			}
			fmt.Fprintf(&b, "%s %s: %s\n", mark, c.Name, c.Detail)
		}
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		if ok {
			b.WriteString("ready\n")
		} else {
			w.WriteHeader(http.StatusServiceUnavailable)
			b.WriteString("not ready\n")
		}
		_, _ = w.Write([]byte(b.String()))
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(g, promhttp.HandlerOpts{}))
	return mux
}

// ServeOps listens on addr and serves h until ctx ends; it returns the address it
// listens on (for ":0") and a function that waits for the server to stop.
func ServeOps(ctx context.Context, addr string, h http.Handler, log *slog.Logger) (net.Addr, func(), error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, nil, fmt.Errorf("http: %w", err)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("http server", "err", err)
		}
	}()
	stop := context.AfterFunc(ctx, func() {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	})
	log.Info("http ready", "addr", l.Addr().String())
	if tcp, ok := l.Addr().(*net.TCPAddr); ok && !tcp.IP.IsLoopback() {
		// Everything here is read-only, but it shows every host's qubes and events.
		log.Warn("http: no authentication, and not on loopback: anyone who reaches this address reads the qubes and events of every host",
			"addr", l.Addr().String())
	}
	return l.Addr(), func() {
		stop()
		_ = srv.Close()
		<-done
	}, nil
}
