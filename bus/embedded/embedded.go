// Package embedded runs a nats-server with JetStream inside the process, for
// `qubesbus run` and for tests.
package embedded

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// Config of an embedded server.
type Config struct {
	StoreDir   string // JetStream file store; required
	Host       string // listen address; default 127.0.0.1
	Port       int    // client port; -1 picks a free one; 0 means 4222
	ServerName string
	// Cluster, if ClusterPort is set, joins a JetStream cluster.
	ClusterName string
	ClusterPort int      // -1 picks a free one
	Routes      []string // nats-route://host:port of the other nodes
	// SyncAlways fsyncs every JetStream write: an acknowledged message then survives a
	// power cut, at about a tenth of the publish rate. Off, the file store syncs every
	// two minutes and an acknowledged message survives a killed process (page cache).
	SyncAlways bool
	// DontListen serves in-process connections only.
	DontListen bool
	// HTTP, if set, is the host:port of nats-server's monitoring endpoint (/varz,
	// /jsz, /connz, …), for nats-surveyor or prometheus-nats-exporter; port 0 picks a
	// free one (Server.MonitorAddr). It has no authentication: bind it to loopback or
	// a management network.
	HTTP string
	// Users, if any, are the only clients the server accepts (nkey users with their
	// permissions: access.Keys.ServerUsers), in-process connections included.
	Users []*server.NkeyUser
	Debug bool
}

// Validate reports every problem at once.
func (c Config) Validate() error {
	var errs []error
	if c.StoreDir == "" {
		errs = append(errs, errors.New("no JetStream store dir"))
	}
	if c.ClusterPort != 0 && c.ClusterName == "" {
		errs = append(errs, errors.New("cluster port without a cluster name"))
	}
	if c.HTTP != "" {
		if _, _, err := monitorHostPort(c.HTTP); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Start runs a server and waits until it accepts connections (and, in a cluster, until
// JetStream is ready) or ctx ends.
func Start(ctx context.Context, cfg Config) (*server.Server, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("embedded nats config: %w", err)
	}
	host := cfg.Host
	if host == "" {
		host = "127.0.0.1"
	}
	opts := &server.Options{
		ServerName: cfg.ServerName,
		Host:       host,
		Port:       cfg.Port,
		JetStream:  true,
		StoreDir:   cfg.StoreDir,
		NoSigs:     true,
		DontListen: cfg.DontListen,
		Debug:      cfg.Debug,
		SyncAlways: cfg.SyncAlways,
		// Larger payloads are never needed (a call is at most 64 KiB), but a GetAll of
		// 10 000 qubes' worth of state crosses the bus in one reply.
		MaxPayload: 8 << 20,
		Nkeys:      cfg.Users,
		// Each host's services hold a few consumers of the shared streams (a config
		// follower per service, the events watchers): a lab of 1000 hosts needs more
		// than the server's default of 1000 per stream.
		JetStreamLimits: server.JSLimitOpts{DefaultMaxConsumers: -1},
	}
	if cfg.HTTP != "" {
		opts.HTTPHost, opts.HTTPPort, _ = monitorHostPort(cfg.HTTP) // checked by Validate
	}
	if cfg.ClusterPort != 0 {
		opts.Cluster = server.ClusterOpts{Name: cfg.ClusterName, Host: host, Port: cfg.ClusterPort}
		for _, r := range cfg.Routes {
			u, err := url.Parse(r)
			if err != nil {
				return nil, fmt.Errorf("route %q: %w", r, err)
			}
			opts.Routes = append(opts.Routes, u)
		}
	}
	ns, err := server.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("new nats server: %w", err)
	}
	if cfg.Debug {
		ns.ConfigureLogger()
	}
	// A server that cannot start (its port taken, the store unusable) does not say so
	// to its caller: it logs the reason with Fatalf, stays not ready, and goes on. (Its
	// own loggers would exit the process there.) So every Fatalf goes to fatal, and the
	// wait below ends at the first. This sees the failure the server itself met, for
	// the client and the cluster port alike, with no race against another process
	// taking the port between a check and the server's own listen.
	fatal := make(chan error, 1)
	ns.SetLoggerV2(&fatalLogger{Logger: ns.Logger(), fatal: fatal}, cfg.Debug, false, false)
	go ns.Start()
	wait := 10 * time.Second
	if dl, ok := ctx.Deadline(); ok {
		wait = time.Until(dl)
	}
	fail := func(err error) (*server.Server, error) {
		ns.Shutdown()
		ns.WaitForShutdown()
		return nil, err
	}
	// Short steps, so that ctx ending stops the wait and not only its deadline.
	start := time.Now()
	for {
		ready := ns.ReadyForConnections(50 * time.Millisecond)
		select {
		case err := <-fatal:
			return fail(err)
		default:
		}
		if ready {
			return ns, nil
		}
		if err := ctx.Err(); err != nil {
			return fail(fmt.Errorf("nats server not ready: %w", err))
		}
		if time.Since(start) >= wait {
			return fail(fmt.Errorf("nats server not ready after %s", wait))
		}
	}
}

// fatalLogger passes the server's log lines on to Logger (none: dropped) and its fatal
// errors to fatal as well, logging them as errors instead of exiting.
type fatalLogger struct {
	server.Logger
	fatal chan<- error
}

func (l *fatalLogger) Fatalf(format string, v ...any) {
	select {
	case l.fatal <- fatalError(format, v):
	default: // the first is the one reported
	}
	l.Errorf(format, v...)
}

func (l *fatalLogger) Noticef(format string, v ...any) {
	if l.Logger != nil {
		l.Logger.Noticef(format, v...)
	}
}

func (l *fatalLogger) Warnf(format string, v ...any) {
	if l.Logger != nil {
		l.Logger.Warnf(format, v...)
	}
}

func (l *fatalLogger) Errorf(format string, v ...any) {
	if l.Logger != nil {
		l.Logger.Errorf(format, v...)
	}
}

func (l *fatalLogger) Debugf(format string, v ...any) {
	if l.Logger != nil {
		l.Logger.Debugf(format, v...)
	}
}

func (l *fatalLogger) Tracef(format string, v ...any) {
	if l.Logger != nil {
		l.Logger.Tracef(format, v...)
	}
}

// fatalError is the error of a server's Fatalf: a listen failure as
// "nats: listen 127.0.0.1:4222: address already in use" (the cluster port as
// "nats cluster: …"), matching errors.Is(err, syscall.EADDRINUSE); anything else as
// the server wrote it.
func fatalError(format string, v []any) error {
	var cause error
	for _, a := range v {
		if e, ok := a.(error); ok {
			cause = e
			break
		}
	}
	var op *net.OpError
	if errors.As(cause, &op) && op.Op == "listen" && op.Addr != nil {
		what := "nats"
		if strings.Contains(format, "router") {
			what = "nats cluster"
		}
		inner := op.Err
		var se *os.SyscallError
		if errors.As(inner, &se) {
			inner = se.Err
		}
		return fmt.Errorf("%s: listen %s: %w", what, op.Addr, inner)
	}
	return &startError{msg: fmt.Sprintf(format, v...), cause: cause}
}

// startError is a server's fatal error as it wrote it, wrapping the error it names.
type startError struct {
	msg   string
	cause error
}

func (e *startError) Error() string { return "nats server: " + e.msg }
func (e *startError) Unwrap() error { return e.cause }

// ErrMonitorAddr is a monitoring address that is not host:port.
var ErrMonitorAddr = errors.New("nats monitoring address: want host:port")

// monitorHostPort splits a monitoring address into the server's options: port 0 is
// the server's "any free port" (-1), since its 0 turns monitoring off.
func monitorHostPort(addr string) (string, int, error) {
	host, p, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, fmt.Errorf("%w: %q: %w", ErrMonitorAddr, addr, err)
	}
	port, err := strconv.Atoi(p)
	if err != nil || port < 0 || port > 65535 {
		return "", 0, fmt.Errorf("%w: %q: bad port", ErrMonitorAddr, addr)
	}
	if port == 0 {
		port = -1
	}
	return host, port, nil
}
