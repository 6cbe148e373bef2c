// Package system wires a whole qubesbus host: NATS (embedded or external), the
// persistence, vmlifecycle and properties services, and the socket gateway.
package system

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/cloudevent"
	"github.com/qubesbus/qubesbus/bus/embedded"
	"github.com/qubesbus/qubesbus/bus/lease"
	"github.com/qubesbus/qubesbus/bus/policy"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/schemas/adminapi"
	"github.com/qubesbus/qubesbus/services/gateway"
	"github.com/qubesbus/qubesbus/services/persistence"
	"github.com/qubesbus/qubesbus/services/persistence/replica"
	"github.com/qubesbus/qubesbus/services/properties"
	"github.com/qubesbus/qubesbus/services/vmlifecycle"
	"github.com/qubesbus/qubesbus/services/vmlifecycle/hvbus"
	"github.com/qubesbus/qubesbus/services/vmlifecycle/simdriver"
)

// Version of the services, announced through micro discovery.
const Version = "0.1.0"

// Config of one host.
type Config struct {
	Socket      string // gateway socket path
	SocketGroup string
	DataDir     string // qubes.xml and the embedded JetStream store
	QubesXML    string // seed copied into DataDir on first start
	HostID      string
	NATSURL     string // external NATS; empty runs an embedded server
	NATSPort    int    // embedded server client port: 0 = 4222, -1 = any free port
	NATSCreds   string
	NATSUser    string
	NATSPass    string
	// ServiceNATSURLs connects single services to other servers of the same cluster
	// (by service name, or "setup"); the rest use NATSURL.
	ServiceNATSURLs map[string]string
	IdleTimeout     time.Duration
	// EventsWriteTimeout cuts off an admin.Events subscriber that stops reading.
	EventsWriteTimeout time.Duration
	Replicas           int // JetStream replicas of the streams: 1 (default) or 3 in a cluster
	// EventsMaxAge and EventsMaxBytes bound QUBES_EVENTS (zero: 24 h, 1 GiB).
	EventsMaxAge   time.Duration
	EventsMaxBytes int64
	// PolicyFile holds access rules (bus/policy); without one only dom0 may call.
	PolicyFile string
	// RuntimeMaxAge bounds how long properties serves cached runtime values without a
	// change notice (zero: 1 s).
	RuntimeMaxAge time.Duration
	// LeaseTTL is how long a dead lifecycle instance keeps its lease before a standby
	// takes over (zero: lease.DefaultTTL). Every instance must use the same.
	LeaseTTL time.Duration
	// Standby starts a lifecycle instance without waiting for it to hold the lease
	// (a second instance in a cluster).
	Standby bool
	// NATSTLS connects with TLS (server CA, client certificate).
	NATSTLS bus.TLSFiles
	// SaveAfterReply rewrites qubes.xml right after replying to a change rather than
	// before (qubesd's way); the change is durable in the change log either way.
	SaveAfterReply bool
}

// conn is how a connection named name reaches NATS at url with this config's
// credentials.
func (c Config) conn(url, name string) bus.ConnConfig {
	return bus.ConnConfig{URL: url, Creds: c.NATSCreds, User: c.NATSUser, Password: c.NATSPass, TLS: c.NATSTLS, Name: name}
}

// Validate reports every problem at once.
func (c Config) Validate() error {
	var errs []error
	if c.Socket == "" {
		errs = append(errs, errors.New("no socket path"))
	}
	if c.DataDir == "" {
		errs = append(errs, errors.New("no data dir"))
	}
	if c.HostID == "" {
		errs = append(errs, errors.New("no host id"))
	}
	return errors.Join(errs...)
}

// System is a running host.
type System struct {
	NATS     *server.Server // nil with an external NATS
	NATSURL  string
	Socket   string
	Store    *persistence.Store
	log      *slog.Logger
	conns    []*nats.Conn
	services []micro.Service
	// policy decides which source may call what (nil: dom0 only).
	policy    *policy.Policy
	policyErr error
	// ctx lives as long as the system: services and calls run under it, not under the
	// context that bounded start-up.
	ctx    context.Context
	cancel context.CancelFunc
	done   sync.WaitGroup
}

func newSystem(ctx context.Context, cfg Config, log *slog.Logger) *System {
	s := &System{Socket: cfg.Socket, log: log}
	if cfg.PolicyFile != "" {
		// Start fails on a bad policy file (checked in Validate); a nil policy
		// allows dom0 only.
		s.policy, s.policyErr = policy.Load(cfg.PolicyFile)
	}
	s.ctx, s.cancel = context.WithCancel(context.WithoutCancel(ctx))
	return s
}

// Start brings a host up and returns once the socket accepts calls.
func Start(ctx context.Context, cfg Config, log *slog.Logger) (_ *System, err error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	if _, ok := ctx.Deadline(); !ok {
		// Start-up waits on NATS and on the other services: never forever.
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 2*time.Minute)
		defer cancel()
	}
	s := newSystem(ctx, cfg, log)
	if s.policyErr != nil {
		return nil, s.policyErr
	}
	defer func() {
		if err != nil {
			s.Stop()
		}
	}()
	host := subject.ForHost(cfg.HostID)
	url := cfg.NATSURL
	if url == "" {
		s.NATS, err = embedded.Start(ctx, embedded.Config{StoreDir: filepath.Join(cfg.DataDir, "jetstream"), Port: cfg.NATSPort})
		if err != nil {
			return nil, err
		}
		url = s.NATS.ClientURL()
	}
	s.NATSURL = url
	connect := func(name string) (*nats.Conn, error) {
		cc := cfg.conn(url, "qubesbus-"+name+"-"+cfg.HostID)
		if u := cfg.ServiceNATSURLs[name]; u != "" {
			cc.URL = u
		} else if s.NATS != nil {
			cc.InProcess = s.NATS
		}
		nc, err := bus.Connect(ctx, cc, log)
		if err == nil {
			s.conns = append(s.conns, nc)
		}
		return nc, err
	}

	// The events stream exists before any service may publish to it.
	enc, err := connect("setup")
	if err != nil {
		return nil, err
	}
	if err := ensureStreams(ctx, enc, cfg, false); err != nil {
		return nil, err
	}
	for _, name := range Services {
		nc, err := connect(name)
		if err != nil {
			return nil, err
		}
		if err := s.startService(name, nc, host, cfg); err != nil {
			return nil, err
		}
	}
	log.Info("socket ready", "socket", cfg.Socket, "nats", url, "host", cfg.HostID)
	return s, nil
}

// ensureStreams creates the JetStream streams and buckets qubesbus needs.
// With onlyIfMissing an existing one is left as it is: a service running as its own
// NATS user may read stream info but not change streams (deploy/nats), and a denied
// request is not answered at all.
func ensureStreams(ctx context.Context, nc *nats.Conn, cfg Config, onlyIfMissing bool) error {
	js, err := jetstream.New(nc)
	if err != nil {
		return fmt.Errorf("jetstream: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	ensure := []struct {
		stream string
		create func() error
	}{
		{cloudevent.StreamName, func() error {
			_, err := cloudevent.EnsureStream(ctx, js, cloudevent.StreamConfig{Replicas: cfg.Replicas, MaxAge: cfg.EventsMaxAge, MaxBytes: cfg.EventsMaxBytes})
			return err
		}},
		{hvbus.NoticeStream, func() error { return hvbus.EnsureNoticeStream(ctx, js, cfg.Replicas) }},
		{"KV_" + lease.Bucket, func() error {
			_, err := lease.Open(ctx, js, cfg.LeaseTTL, cfg.Replicas)
			return err
		}},
	}
	for _, e := range ensure {
		if onlyIfMissing {
			if _, err := js.Stream(ctx, e.stream); err == nil {
				continue
			}
		}
		if err := e.create(); err != nil {
			return fmt.Errorf("ensure %s: %w", e.stream, err)
		}
	}
	return nil
}

// clientParts are what a service over the configuration needs: a replica of it, an
// event publisher and JetStream, all on the service's connection.
func (s *System) clientParts(nc *nats.Conn, host subject.Host, cfg Config, log *slog.Logger) (*replica.Replica, *cloudevent.Publisher, jetstream.JetStream, error) {
	rep, err := persistence.Follow(s.ctx, nc, host, log)
	if err != nil {
		return nil, nil, nil, err
	}
	pub, err := publisher(nc, cfg.HostID)
	if err != nil {
		return nil, nil, nil, err
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("jetstream: %w", err)
	}
	return rep, pub, js, nil
}

// publisher returns the event publisher of one service connection.
func publisher(nc *nats.Conn, hostID string) (*cloudevent.Publisher, error) {
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, fmt.Errorf("jetstream: %w", err)
	}
	return cloudevent.NewPublisher(js, hostID), nil
}

// Services in start order: each needs the ones before it.
var Services = []string{"persistence", "hypervisor", "vmlifecycle", "properties", "gateway"}

// startService starts one service on its own connection.
func (s *System) startService(name string, nc *nats.Conn, host subject.Host, cfg Config) error {
	log := s.log.With("service", name)
	ctx := s.ctx
	switch name {
	case "persistence":
		store, err := persistence.Open(persistence.Config{Host: host, DataDir: cfg.DataDir, SeedXML: cfg.QubesXML, Replicas: cfg.Replicas}, log)
		if err != nil {
			return err
		}
		s.Store = store
		return s.serve(store.Serve(ctx, nc, Version))
	case "hypervisor":
		// The simulated hypervisor stands for Xen, in its own service so that a standby
		// lifecycle instance can take it over; a test lab drives it on
		// qubes.v1.<host>.lab.* (faults, latencies).
		hv := simdriver.New(simdriver.Config{})
		if err := s.serve(simdriver.ServeLab(nc, host, hv)); err != nil {
			return err
		}
		js, err := jetstream.New(nc)
		if err != nil {
			return fmt.Errorf("jetstream: %w", err)
		}
		return s.serve(hvbus.Serve(ctx, nc, js, host, hv, log))
	case "vmlifecycle":
		return s.startLifecycle(nc, host, cfg, log)
	case "properties":
		rep, pub, js, err := s.clientParts(nc, host, cfg, log)
		if err != nil {
			return err
		}
		// Every instance keeps the notes in one shared bucket. A user without the right
		// to create it (deploy/nats permissions) binds to the one an admin created.
		notes, err := properties.OpenNotes(ctx, js, properties.NotesConfig{Replicas: cfg.Replicas})
		if err != nil {
			var berr error
			if notes, berr = js.KeyValue(ctx, properties.NotesBucket); berr != nil {
				return errors.Join(err, berr)
			}
			log.Warn("notes bucket not ensured; using the existing one", "err", err)
		}
		props, err := properties.New(properties.Config{Host: host, Notes: notes, Auth: s.policy,
			RuntimeMaxAge: cfg.RuntimeMaxAge, SaveAfterReply: cfg.SaveAfterReply},
			adminapi.Registry, rep, vmlifecycle.StatesClient{NC: nc, Host: host},
			persistence.Client{NC: nc, Host: host}, pub, log)
		if err != nil {
			return err
		}
		return s.serve(props.Serve(ctx, nc, Version))
	case "gateway":
		if err := os.MkdirAll(filepath.Dir(cfg.Socket), 0o755); err != nil {
			return fmt.Errorf("socket dir: %w", err)
		}
		l, err := gateway.Listen(cfg.Socket, cfg.SocketGroup)
		if err != nil {
			return err
		}
		gw := gateway.New(gateway.Config{Host: host, IdleTimeout: cfg.IdleTimeout}, nc, adminapi.Registry, log)
		events, err := gateway.NewEvents(gateway.EventsConfig{WriteTimeout: cfg.EventsWriteTimeout}, nc, host, log)
		if err != nil {
			l.Close()
			return err
		}
		gw.HandleStream("admin.Events", events.Serve)
		gw.HandleStream("admin.vm.Stats", gateway.NewStats(nc, host, log).Serve)
		s.done.Add(1)
		go func() {
			defer s.done.Done()
			if err := gw.Serve(ctx, l); err != nil {
				log.Error("gateway stopped", "err", err)
			}
		}()
		return nil
	}
	return fmt.Errorf("no such service %q (want one of %v)", name, Services)
}

// Setup creates the streams and buckets on cfg.NATSURL, or updates their settings.
func Setup(ctx context.Context, cfg Config, log *slog.Logger) error {
	if cfg.NATSURL == "" {
		return errors.New("no NATS URL")
	}
	nc, err := bus.Connect(ctx, cfg.conn(cfg.NATSURL, "qubesbus-setup"), log)
	if err != nil {
		return err
	}
	defer nc.Close()
	if cfg.Replicas == 0 {
		cfg.Replicas = 1
	}
	return ensureStreams(ctx, nc, cfg, false)
}

// StartOne runs a single service against cfg.NATSURL and returns its stop function.
func StartOne(ctx context.Context, name string, cfg Config, log *slog.Logger) (func() error, error) {
	if cfg.NATSURL == "" {
		return nil, errors.New("no NATS URL")
	}
	if cfg.Replicas == 0 {
		cfg.Replicas = 1
	}
	// One of several lifecycle instances: it serves once it holds the host's lease.
	cfg.Standby = true
	s := newSystem(ctx, cfg, log)
	if s.policyErr != nil {
		return nil, s.policyErr
	}
	s.NATSURL = cfg.NATSURL
	nc, err := bus.Connect(ctx, cfg.conn(cfg.NATSURL, "qubesbus-"+name+"-"+cfg.HostID), log)
	if err != nil {
		return nil, err
	}
	s.conns = append(s.conns, nc)
	// On a server without users, whichever service starts first creates the streams
	// (idempotent). A service running as its own user (deploy/nats permissions) may not,
	// and a denied request gets no answer: `qubesbus setup` has created them.
	if cfg.NATSUser == "" && cfg.NATSCreds == "" {
		if err := ensureStreams(ctx, nc, cfg, true); err != nil {
			s.Stop()
			return nil, err
		}
	}
	if err := s.startService(name, nc, subject.ForHost(cfg.HostID), cfg); err != nil {
		s.Stop()
		return nil, err
	}
	if name == "gateway" {
		log.Info("socket ready", "socket", cfg.Socket, "nats", cfg.NATSURL, "host", cfg.HostID)
	}
	return s.Stop, nil
}

func (s *System) serve(svc micro.Service, err error) error {
	if err != nil {
		return err
	}
	s.services = append(s.services, svc)
	return nil
}

// Stop closes the socket, waits for calls in progress, saves qubes.xml and stops the
// services and NATS.
func (s *System) Stop() error {
	s.cancel()
	s.done.Wait()
	var errs []error
	if s.Store != nil {
		// Stops taking changes and writes qubes.xml once more if it is behind.
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		errs = append(errs, s.Store.Close(ctx))
		cancel()
	}
	for _, svc := range s.services {
		errs = append(errs, svc.Stop())
	}
	for _, nc := range s.conns {
		if err := nc.Drain(); err != nil && !errors.Is(err, nats.ErrConnectionClosed) {
			errs = append(errs, err)
		}
	}
	if s.NATS != nil {
		s.NATS.Shutdown()
		s.NATS.WaitForShutdown()
	}
	return errors.Join(errs...)
}
