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
	"github.com/prometheus/client_golang/prometheus"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/audit"
	"github.com/qubesbus/qubesbus/bus/cloudevent"
	"github.com/qubesbus/qubesbus/bus/embedded"
	"github.com/qubesbus/qubesbus/bus/lease"
	"github.com/qubesbus/qubesbus/bus/policy"
	"github.com/qubesbus/qubesbus/bus/rpc"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/access"
	"github.com/qubesbus/qubesbus/schemas/changelog"
	"github.com/qubesbus/qubesbus/schemas/configstore"
	"github.com/qubesbus/qubesbus/schemas/replica"
	storageapi "github.com/qubesbus/qubesbus/schemas/storage"
	"github.com/qubesbus/qubesbus/services/backup"
	"github.com/qubesbus/qubesbus/services/backup/archive"
	"github.com/qubesbus/qubesbus/services/devices"
	"github.com/qubesbus/qubesbus/services/gateway"
	"github.com/qubesbus/qubesbus/services/persistence"
	"github.com/qubesbus/qubesbus/services/properties"
	"github.com/qubesbus/qubesbus/services/storage"
	"github.com/qubesbus/qubesbus/services/vmlifecycle/hvbus"
	"github.com/qubesbus/qubesbus/services/vmlifecycle/simdriver"
)

// Config of one host.
type Config struct {
	Socket      string // gateway socket path
	SocketGroup string
	DataDir     string // qubes.xml and the embedded JetStream store
	QubesXML    string // seed copied into DataDir on first start
	HostID      string
	NATSURL     string // external NATS; empty runs an embedded server
	// NATSPort is the embedded server's TCP client port: 0 opens none (the services
	// connect in-process), -1 any free port.
	NATSPort int
	// NATSHTTP, if set, opens the embedded server's monitoring endpoint (/varz, /jsz,
	// /connz) on this host:port (port 0: any free one, Server.MonitorAddr). Only
	// with the embedded server: an external one has its own (http_port).
	NATSHTTP string
	// NKeyDir holds one nkey seed per role (cmd/qubesbus/internal/access). With the embedded server it
	// defaults to <DataDir>/nkeys, created on first start, and the server accepts
	// only those roles. With an external server a service uses its role's seed from
	// here when the directory has one and no other credentials are given.
	NKeyDir   string
	NATSCreds string
	NATSUser  string
	NATSPass  string
	// InProcess is an embedded server of this process that NATSURL names (a lab's):
	// the services connect to it in-process, without a socket pair each.
	InProcess *server.Server
	// StreamsReady says the streams and buckets exist (a lab made them once with
	// Setup): the host only checks, rather than every host updating them.
	StreamsReady bool
	// ServiceNATSURLs connects single services to other servers of the same cluster
	// (by service name, or setupConn); the rest use NATSURL.
	ServiceNATSURLs map[string]string
	IdleTimeout     time.Duration
	// EventsWriteTimeout cuts off an admin.Events subscriber that stops reading.
	EventsWriteTimeout time.Duration
	Replicas           int // JetStream replicas of the streams: 1 (default) or 3 in a cluster
	// EventsMaxAge and EventsMaxBytes bound QUBES_EVENTS (zero: 24 h, 1 GiB).
	EventsMaxAge   time.Duration
	EventsMaxBytes int64
	// AuditMaxAge and AuditMaxBytes bound QUBES_AUDIT, the audit trail (zero: 90 days,
	// 1 GiB).
	AuditMaxAge   time.Duration
	AuditMaxBytes int64
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
	// Hypervisor configures the simulated hypervisor (zero: the reference host of the
	// recordings 40-89: its PCI devices, sda of sys-net).
	Hypervisor simdriver.Config
	// Storage configures the storage service's host (zero: the real filesystem under
	// <DataDir>/storage).
	Storage StorageHost
	// BackupProfiles is the directory of backup profiles, <id>.conf (default
	// /etc/qubes/backup, as dom0).
	BackupProfiles string
	// BackupSinks stands for the qubes' filesystems a backup can be sent to:
	// <BackupSinks>/<qube>/<destination_path> (default <DataDir>/backup-sinks).
	BackupSinks string
	// BackupScrypt is the key derivation cost of backup parts (zero: the archive's
	// default); tests lower it.
	BackupScrypt archive.ScryptParams
	// Metrics, if set, receives the host's metrics (bus/metrics); a lab wraps one
	// registry with a host label per host.
	Metrics prometheus.Registerer
}

// StorageHost is what the storage service sees of the machine: where pool paths
// lead, and for a simulated host fixed filesystem numbers, image times and tokens.
type StorageHost struct {
	Root     string // prefix of pool paths ("/": the real ones); default <DataDir>/storage
	StatFS   func(path string) (size, used int64, err error)
	Stamp    *time.Time
	NewToken func() string
}

// conn is how a connection named name reaches NATS at url with this config's
// credentials.
func (c Config) conn(url, name string) bus.ConnConfig {
	return bus.ConnConfig{URL: url, Creds: c.NATSCreds, User: c.NATSUser, Password: c.NATSPass, TLS: c.NATSTLS, Name: name}
}

// connAs is conn for a role: with no credentials given, its seed in NKeyDir if there
// is one.
func (c Config) connAs(url, role, name string) bus.ConnConfig {
	cc := c.conn(url, name)
	cc.InboxPrefix = access.InboxPrefix(role)
	if c.NATSCreds == "" && c.NATSUser == "" && c.NKeyDir != "" {
		if seed := access.SeedFile(c.NKeyDir, role); fileExists(seed) {
			cc.NKeySeed = seed
		}
	}
	return cc
}

// withKeyDir defaults NKeyDir to the data dir's, where `qubesbus run` keeps the keys.
func (c Config) withKeyDir() Config {
	if c.NKeyDir == "" && c.DataDir != "" {
		c.NKeyDir = filepath.Join(c.DataDir, "nkeys")
	}
	return c
}

func fileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// setupConn is the part of the system that creates the streams and buckets before
// the services start (a name of ServiceNATSURLs beside the services').
const setupConn = "setup"

// connName names the connection of a part of the system (a service, setupConn) on a
// host: qubesbus-<part>-<host>, as the metrics' conn label and readiness show it.
func connName(part, host string) string { return "qubesbus-" + part + "-" + host }

// roleOf is the NATS role a part of the system connects as: each service its own,
// set-up as the admin.
func roleOf(name string) string {
	if _, ok := access.Find(name); ok {
		return name
	}
	return access.Admin
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
	if c.NATSHTTP != "" && c.NATSURL != "" {
		errs = append(errs, ErrNATSHTTPExternal)
	}
	return errors.Join(errs...)
}

// ErrNATSHTTPExternal: the monitoring endpoint of a NATS server qubesbus does not run
// is that server's to open (its http_port).
var ErrNATSHTTPExternal = errors.New("a NATS monitoring address needs the embedded server (an external one opens its own, http_port)")

// System is a running host.
type System struct {
	NATS    *server.Server // nil with an external NATS
	NATSURL string
	// Keys are the roles' nkeys of the embedded server (nil with an external NATS).
	Keys      *access.Keys
	cfg       Config
	Socket    string
	Store     *persistence.Store
	logSyncer *embedded.StreamSyncer // the change log's, when this process fsyncs it
	log       *slog.Logger
	conns     []*nats.Conn
	services  []micro.Service
	// policy decides which source may call what (nil: dom0 only).
	policy    *policy.Policy
	policyErr error
	// replica follows the host's configuration for every service of this process
	// that reads it (nil until the lifecycle service has started it).
	replica *replica.Replica
	// ctx lives as long as the system: services and calls run under it, not under the
	// context that bounded start-up.
	ctx    context.Context
	cancel context.CancelFunc
	done   sync.WaitGroup
	// background holds what Stop waits for once ctx is cancelled, before it closes
	// the connections: services' work that outlives their handlers (the device watch).
	background []<-chan struct{}
	// obs is what the metrics and the readiness check read (ops.go).
	obs observed
	// local lets the gateway reach the services of this process without NATS.
	local *rpc.Local
	// tap passes the events the services of this process send to its gateway's
	// admin.Events before they reach NATS.
	tap cloudevent.Tap
}

func newSystem(ctx context.Context, cfg Config, log *slog.Logger) *System {
	s := &System{Socket: cfg.Socket, log: log, local: rpc.NewLocal()}
	if cfg.PolicyFile != "" {
		// Start fails on a bad policy file (checked in Validate); a nil policy
		// allows dom0 only.
		s.policy, s.policyErr = policy.Load(cfg.PolicyFile)
	}
	s.ctx, s.cancel = context.WithCancel(context.WithoutCancel(ctx))
	s.initMetrics(cfg.Metrics)
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
	// Until Start returns, ctx ending (a signal) also ends what runs under the
	// system's own context: a service's start-up, the wait for the lifecycle lease.
	unwatch := context.AfterFunc(ctx, s.cancel)
	defer func() {
		if !unwatch() && err == nil {
			err = fmt.Errorf("start-up interrupted: %w", context.Cause(ctx))
		}
	}()
	host := subject.ForHost(cfg.HostID)
	url := cfg.NATSURL
	if url == "" {
		// No client without a role's key gets onto the bus, and no TCP port opens
		// unless asked for.
		cfg = cfg.withKeyDir()
		if s.Keys, err = access.Ensure(cfg.NKeyDir); err != nil {
			return nil, err
		}
		cfg.NATSCreds, cfg.NATSUser, cfg.NATSPass = "", "", ""
		s.NATS, err = embedded.Start(ctx, embedded.Config{StoreDir: filepath.Join(cfg.DataDir, "jetstream"),
			Port: cfg.NATSPort, DontListen: cfg.NATSPort == 0, Users: s.Keys.ServerUsers(cfg.HostID), HTTP: cfg.NATSHTTP})
		if err != nil {
			return nil, err
		}
		if a := s.NATS.MonitorAddr(); a != nil {
			log.Info("nats monitoring ready", "addr", a.String())
		}
		url = s.NATS.ClientURL()
	}
	s.NATSURL = url
	s.cfg = cfg
	dial := func(name string) (*nats.Conn, error) {
		cc := cfg.connAs(url, roleOf(name), connName(name, cfg.HostID))
		if u := cfg.ServiceNATSURLs[name]; u != "" {
			cc.URL = u
		} else if s.NATS != nil {
			cc.InProcess = s.NATS
		} else if cfg.InProcess != nil {
			cc.InProcess = cfg.InProcess
		}
		return bus.Connect(ctx, cc, log)
	}
	connect := func(name string) (*nats.Conn, error) {
		nc, err := dial(name)
		if err == nil {
			s.addConn(nc)
		}
		return nc, err
	}

	// The events stream exists before any service may publish to it. The setup
	// connection is needed for that only.
	enc, err := dial(setupConn)
	if err != nil {
		return nil, err
	}
	err = ensureStreams(ctx, enc, cfg, cfg.StreamsReady)
	enc.Close()
	if err != nil {
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
	natsAt := url
	if s.NATS != nil && s.NATS.Addr() == nil {
		natsAt = "in-process only (no TCP port: --nats-port opens one)"
	}
	log.Info("socket ready", "socket", cfg.Socket, "nats", natsAt, "host", cfg.HostID)
	s.obs.started.Store(true)
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
		{audit.StreamName, func() error {
			_, err := audit.EnsureStream(ctx, js, audit.StreamConfig{Replicas: cfg.Replicas, MaxAge: cfg.AuditMaxAge, MaxBytes: cfg.AuditMaxBytes})
			return err
		}},
		{"KV_" + lease.Bucket, func() error {
			_, err := lease.Open(ctx, js, cfg.LeaseTTL, cfg.Replicas)
			return err
		}},
		{"KV_" + devices.DevicesBucket, func() error {
			_, err := devices.OpenDevicesBucket(ctx, js, cfg.Replicas)
			return err
		}},
		{"KV_" + storage.SimBucket, func() error {
			_, err := storage.OpenSimBucket(ctx, js, cfg.Replicas, nil)
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

// service is one entry of the table of services: how to start it on its own
// connection. Each returns its micro service (stopped with the system), or nil for a
// service that runs under the system's context alone.
type service struct {
	name  rpc.Service
	start func(s *System, nc *nats.Conn, host subject.Host, cfg Config, log *slog.Logger) (micro.Service, error)
}

// services in start order: each needs the ones before it.
var services = []service{
	{rpc.Persistence, startPersistence},
	{rpc.Hypervisor, startHypervisor},
	{rpc.VMLifecycle, (*System).startLifecycle},
	{rpc.Storage, startStorage},
	{rpc.Properties, startProperties},
	{rpc.Devices, startDevices},
	{rpc.Backup, startBackup},
	{rpc.Gateway, startGateway},
}

// Services names the services in start order (`qubesbus serve <name>`).
var Services = func() []string {
	out := make([]string, len(services))
	for i, e := range services {
		out[i] = string(e.name)
	}
	return out
}()

func startPersistence(s *System, nc *nats.Conn, host subject.Host, cfg Config, log *slog.Logger) (micro.Service, error) {
	pc := persistence.Config{Host: host, DataDir: cfg.DataDir, SeedXML: cfg.QubesXML, Replicas: cfg.Replicas, Log: log}
	// With the server in this process, persistence fsyncs the change log's files
	// itself, once per group of changes (qubesd's durability: an acknowledged change
	// survives a power cut). A server elsewhere keeps them as durable as its own
	// settings do (replicas 3 in a cluster, or sync_interval: always).
	if s.NATS != nil && cfg.ServiceNATSURLs[string(rpc.Persistence)] == "" && cfg.Replicas <= 1 {
		syncer, err := embedded.NewStreamSyncer(s.NATS, "", changelog.StreamName)
		if err != nil {
			return nil, err
		}
		pc.SyncLog = syncer.Sync
		s.logSyncer = syncer // closed after the store's last sync (Stop)
	}
	store, err := persistence.New(pc)
	if err != nil {
		return nil, err
	}
	s.Store = store
	svc, err := store.Serve(s.ctx, nc)
	if err == nil {
		s.obs.store.Store(store)
	}
	return svc, err
}

// startHypervisor runs the simulated hypervisor, which stands for Xen, as its own
// service so that a standby lifecycle instance can take it over; a test lab drives it
// on qubes.v1.<host>.lab.* (faults, latencies).
func startHypervisor(s *System, nc *nats.Conn, host subject.Host, cfg Config, log *slog.Logger) (micro.Service, error) {
	hv := simdriver.New(cfg.Hypervisor)
	ls, err := simdriver.NewLabService(simdriver.LabServiceConfig{Host: host, Hypervisor: hv})
	if err != nil {
		return nil, err
	}
	lab, err := ls.Serve(s.ctx, nc)
	if err != nil {
		return nil, err
	}
	s.services = append(s.services, lab)
	srv, err := hvbus.New(hvbus.Config{Host: host, Driver: hv, Devices: hv, DeviceChanges: hv, Log: log})
	if err != nil {
		return nil, err
	}
	return srv.Serve(s.ctx, nc)
}

// startStorage serves pools and volumes. File pools keep their images under
// <data-dir>/storage unless Config.Storage.Root says otherwise (the fixture's
// /var/lib/qubes maps to <data-dir>/storage/var/lib/qubes).
func startStorage(s *System, nc *nats.Conn, host subject.Host, cfg Config, log *slog.Logger) (micro.Service, error) {
	sc := cfg.Storage
	if sc.Root == "" {
		sc.Root = filepath.Join(cfg.DataDir, "storage")
	}
	rep, events, err := s.observeService(rpc.Storage, nc, host, log)
	if err != nil {
		return nil, err
	}
	st, err := storage.New(storage.Config{Host: host, Log: log, Auth: s.policy, Replicas: cfg.Replicas,
		Root: sc.Root, StatFS: sc.StatFS, Stamp: sc.Stamp, NewToken: sc.NewToken, Replica: rep, Events: events,
		LocalStore: s.localStore()})
	if err != nil {
		return nil, err
	}
	return st.Serve(s.ctx, nc)
}

func startDevices(s *System, nc *nats.Conn, host subject.Host, cfg Config, log *slog.Logger) (micro.Service, error) {
	rep, events, err := s.observeService(rpc.Devices, nc, host, log)
	if err != nil {
		return nil, err
	}
	dev, err := devices.New(devices.Config{Host: host, Log: log, Auth: s.policy, Replicas: cfg.Replicas, Replica: rep, Events: events,
		LocalStore: s.localStore()})
	if err != nil {
		return nil, err
	}
	svc, err := dev.Serve(s.ctx, nc)
	if err == nil {
		s.background = append(s.background, dev.Stopped())
	}
	return svc, err
}

// startBackup serves admin.backup.*: profiles from cfg.BackupProfiles, archives to
// dom0 paths or to a qube's sink directory under cfg.BackupSinks.
func startBackup(s *System, nc *nats.Conn, host subject.Host, cfg Config, log *slog.Logger) (micro.Service, error) {
	sinks := cfg.BackupSinks
	if sinks == "" && cfg.DataDir != "" {
		sinks = filepath.Join(cfg.DataDir, "backup-sinks")
	}
	rep, events, err := s.observeService(rpc.Backup, nc, host, log)
	if err != nil {
		return nil, err
	}
	b, err := backup.New(backup.Config{Host: host, Log: log, Auth: s.policy, ProfileDir: cfg.BackupProfiles, SinkDir: sinks,
		Scrypt: cfg.BackupScrypt, Replica: rep, Events: events, LocalStore: s.localStore()})
	if err != nil {
		return nil, err
	}
	return b.Serve(s.ctx, nc)
}

func startProperties(s *System, nc *nats.Conn, host subject.Host, cfg Config, log *slog.Logger) (micro.Service, error) {
	events, err := s.eventsPublisher(nc, host)
	if err != nil {
		return nil, err
	}
	pc := properties.Config{Host: host, Log: log, Auth: s.policy, Replicas: cfg.Replicas,
		RuntimeMaxAge: cfg.RuntimeMaxAge, Events: events,
		Volumes: storageapi.Client{NC: nc, Host: host}, Replica: s.replica, Local: s.local}
	pc.LocalStore = s.localStore()
	props, err := properties.New(pc)
	if err != nil {
		return nil, err
	}
	svc, err := props.Serve(s.ctx, nc)
	if err == nil {
		s.obs.addReplica(string(rpc.Properties), props.Replica(), nc)
	}
	return svc, err
}

func startGateway(s *System, nc *nats.Conn, host subject.Host, cfg Config, log *slog.Logger) (micro.Service, error) {
	// The audit trail (QUBES_AUDIT): written by the gateway alone, on its connection.
	aud, err := audit.NewPublisher(nc, audit.PublisherConfig{Host: cfg.HostID, Log: log.With("part", "audit")})
	if err != nil {
		return nil, err
	}
	closeAudit := func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = aud.Close(ctx) // what it could not store is in the log
	}
	gcfg := gateway.Config{Host: host, Log: log, Socket: cfg.Socket, SocketGroup: cfg.SocketGroup,
		IdleTimeout: cfg.IdleTimeout, EventsWriteTimeout: cfg.EventsWriteTimeout, Audit: aud, Local: s.local,
		EventsTap: &s.tap}
	if s.obs.metrics != nil {
		gcfg.Metrics = s.obs.metrics
	}
	gw, err := gateway.New(gcfg)
	if err != nil {
		closeAudit()
		return nil, err
	}
	svc, err := gw.Serve(s.ctx, nc)
	if err != nil {
		closeAudit()
		return nil, err
	}
	s.obs.gateway.Store(gw)
	s.done.Add(1)
	go func() {
		defer s.done.Done()
		gw.Wait()
		closeAudit() // the records of the last calls, before the connection drains
	}()
	return svc, nil
}

// startService starts one service on its own connection.
func (s *System) startService(name string, nc *nats.Conn, host subject.Host, cfg Config) error {
	for _, e := range services {
		if string(e.name) == name {
			svc, err := e.start(s, nc, host, cfg, s.log.With("service", name))
			if err == nil && svc != nil {
				s.services = append(s.services, svc)
			}
			return err
		}
	}
	return fmt.Errorf("no such service %q (want one of %v)", name, Services)
}

// Setup creates the streams and buckets on cfg.NATSURL, or updates their settings.
func Setup(ctx context.Context, cfg Config, log *slog.Logger) error {
	if cfg.NATSURL == "" {
		return errors.New("no NATS URL")
	}
	cfg = cfg.withKeyDir()
	nc, err := bus.Connect(ctx, cfg.connAs(cfg.NATSURL, access.Admin, "qubesbus-"+setupConn), log)
	if err != nil {
		return err
	}
	defer nc.Close()
	if cfg.Replicas == 0 {
		cfg.Replicas = 1
	}
	return ensureStreams(ctx, nc, cfg, false)
}

// StartService runs a single service against cfg.NATSURL (`qubesbus serve`) and
// returns the system of the one service (its readiness and metrics; Stop stops it).
func StartService(ctx context.Context, name string, cfg Config, log *slog.Logger) (*System, error) {
	if cfg.NATSURL == "" {
		return nil, errors.New("no NATS URL")
	}
	if cfg.Replicas == 0 {
		cfg.Replicas = 1
	}
	// One of several lifecycle instances: it serves once it holds the host's lease.
	cfg.Standby = true
	cfg = cfg.withKeyDir()
	s := newSystem(ctx, cfg, log)
	s.cfg = cfg
	if s.policyErr != nil {
		return nil, s.policyErr
	}
	s.NATSURL = cfg.NATSURL
	cc := cfg.connAs(cfg.NATSURL, roleOf(name), connName(name, cfg.HostID))
	nc, err := bus.Connect(ctx, cc, log)
	if err != nil {
		return nil, err
	}
	s.addConn(nc)
	// On a server without users, whichever service starts first creates the streams
	// (idempotent). A service running as its own user (deploy/nats permissions, or its
	// role's key from the key dir of a `qubesbus run`) may not, and a denied request
	// gets no answer: `qubesbus setup` (or the run) has created them.
	if cc.User == "" && cc.Creds == "" && cc.NKeySeed == "" {
		if err := ensureStreams(ctx, nc, cfg, true); err != nil {
			s.Stop()
			return nil, err
		}
	}
	if err := s.startService(name, nc, subject.ForHost(cfg.HostID), cfg); err != nil {
		s.Stop()
		return nil, err
	}
	if name == string(rpc.Gateway) {
		log.Info("socket ready", "socket", cfg.Socket, "nats", cfg.NATSURL, "host", cfg.HostID)
	}
	s.obs.started.Store(true)
	return s, nil
}

// Stop closes the socket, waits for calls in progress, saves qubes.xml and stops the
// services and NATS.
func (s *System) Stop() error {
	s.cancel()
	s.done.Wait()
	var errs []error
	for _, stopped := range s.background {
		select {
		case <-stopped:
		case <-time.After(30 * time.Second):
			errs = append(errs, errors.New("stop: background work still running after 30 s"))
		}
	}
	if s.Store != nil {
		// Stops taking changes and writes qubes.xml once more if it is behind.
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		errs = append(errs, s.Store.Close(ctx))
		cancel()
	}
	if s.logSyncer != nil {
		errs = append(errs, s.logSyncer.Close())
	}
	for _, svc := range s.services {
		errs = append(errs, svc.Stop())
	}
	for _, nc := range s.Conns() {
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

// ConnectAs opens a connection to the system's NATS as a role (cmd/qubesbus/internal/access): in-process
// to the embedded server, with the role's key. Tests, the lab and the load tool use it;
// it is closed with the system.
func (s *System) ConnectAs(ctx context.Context, role, name string) (*nats.Conn, error) {
	cc := s.cfg.connAs(s.NATSURL, role, name)
	if s.NATS != nil {
		cc.InProcess = s.NATS
	}
	nc, err := bus.Connect(ctx, cc, s.log)
	if err != nil {
		return nil, err
	}
	s.addConn(nc)
	return nc, nil
}

// localStore is the persistence instance serving in this process, for the services to
// apply their changes through (configstore.Local); nil when persistence runs
// elsewhere. Persistence starts first.
func (s *System) localStore() configstore.Local {
	if s.Store == nil {
		return nil // not a typed nil: the client would call it
	}
	return s.Store
}
