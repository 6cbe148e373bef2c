package lab

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/qubesbus/qubesbus/bus/embedded"
	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/access"
	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/system"
	"github.com/qubesbus/qubesbus/schemas/config"
	"github.com/qubesbus/qubesbus/schemas/qubesxml"
)

// Config of a lab.
type Config struct {
	Hosts    int
	Qubes    int    // extra AppVMs per host, on top of the seed's qubes
	Seed     string // qubes.xml every host starts from
	Dir      string // one folder per host: socket, data
	NATSURL  string // a cluster to run on; empty starts one embedded server
	NATSPort int    // embedded server port (-1: any)
	// NATSHTTP, if set, opens the embedded server's monitoring endpoint (/varz, /jsz,
	// /connz) on this host:port (port 0: any free one).
	NATSHTTP string
	Replicas int
	// URLs spreads hosts' services over several servers: host i uses URLs[i%len].
	URLs []string
	// Metrics, if set, receives every host's metrics, each with a host label.
	Metrics prometheus.Registerer
	// LeaseTTL is how long a host's lifecycle lease outlives its last renewal (zero:
	// DefaultLeaseTTL). A lab has one lifecycle instance per host and no standby to
	// hand over to, so it trades the quick failover of the 5 s default for leases that
	// survive a loaded machine: at 1000 hosts on 2 cores renewals took over 5 s at
	// times, and hosts lost their leases mid-call.
	LeaseTTL time.Duration
	// Parallel is how many hosts start at once (0: four per CPU). A host's start-up
	// mostly waits on NATS round trips, so a 1000-host lab starts in a fraction of the
	// time one host after another takes.
	Parallel int
}

// DefaultLeaseTTL is a lab host's lifecycle lease TTL unless Config.LeaseTTL says
// otherwise.
const DefaultLeaseTTL = 30 * time.Second

// Lab is a set of running hosts.
type Lab struct {
	NATS  *server.Server // nil on an external cluster
	Keys  *access.Keys   // the roles' keys of the embedded server
	Hosts []*Host
}

// Host is one simulated Qubes host of a lab.
type Host struct {
	ID     string
	Socket string
	*system.System
}

// Start brings every host up; on error the ones already started are stopped.
func Start(ctx context.Context, cfg Config, log *slog.Logger) (_ *Lab, err error) {
	if cfg.Hosts < 1 {
		return nil, errors.New("lab: need at least one host")
	}
	if cfg.NATSHTTP != "" && (cfg.NATSURL != "" || len(cfg.URLs) > 0) {
		return nil, fmt.Errorf("lab: %w", system.ErrNATSHTTPExternal)
	}
	seed, err := qubesxml.Load(cfg.Seed)
	if err != nil {
		return nil, err
	}
	l := &Lab{}
	defer func() {
		if err != nil {
			l.Stop()
		}
	}()
	url := cfg.NATSURL
	var keyDir string
	if url == "" && len(cfg.URLs) == 0 {
		// Every host's services connect as their roles with the lab's keys; so does
		// anyone outside (qubesbus events --nkey-dir <dir>/nkeys).
		keyDir = filepath.Join(cfg.Dir, "nkeys")
		keys, err := access.Ensure(keyDir)
		if err != nil {
			return nil, err
		}
		l.Keys = keys
		hosts := make([]string, cfg.Hosts)
		for i := range hosts {
			hosts[i] = hostID(i)
		}
		l.NATS, err = embedded.Start(ctx, embedded.Config{StoreDir: filepath.Join(cfg.Dir, "nats"), Port: cfg.NATSPort,
			Users: keys.ServerUsers(hosts...), HTTP: cfg.NATSHTTP})
		if err != nil {
			return nil, err
		}
		if a := l.NATS.MonitorAddr(); a != nil {
			log.Info("nats monitoring ready", "addr", a.String())
		}
		url = l.NATS.ClientURL()
	}
	// The streams once for the lab, not once per host (on a cluster each update is a
	// round of the meta group's consensus).
	if cfg.LeaseTTL <= 0 {
		cfg.LeaseTTL = DefaultLeaseTTL
	}
	if err := system.Setup(ctx, system.Config{NATSURL: first(url, cfg.URLs), NKeyDir: keyDir, Replicas: cfg.Replicas,
		DataDir: cfg.Dir, LeaseTTL: cfg.LeaseTTL}, log); err != nil {
		return nil, fmt.Errorf("lab streams: %w", err)
	}
	par := cfg.Parallel
	if par <= 0 {
		par = 4 * runtime.NumCPU()
	}
	l.Hosts = make([]*Host, cfg.Hosts)
	var (
		mu       sync.Mutex
		firstErr error // the cause; the others' start-ups end with it
	)
	sctx, cancel := context.WithCancel(ctx) // the first failure stops the others' start-up
	defer cancel()
	slots := make(chan struct{}, par)
	var wg sync.WaitGroup
	for i := range cfg.Hosts {
		select {
		case slots <- struct{}{}:
		case <-sctx.Done():
		}
		if sctx.Err() != nil {
			break
		}
		wg.Go(func() {
			defer func() { <-slots }()
			h, err := startHost(sctx, cfg, seed, i, url, keyDir, l.NATS, log)
			mu.Lock()
			defer mu.Unlock()
			l.Hosts[i] = h
			if err != nil && firstErr == nil {
				firstErr = err
				cancel()
			}
		})
	}
	wg.Wait()
	err = firstErr
	if err == nil && ctx.Err() != nil {
		err = ctx.Err()
	}
	// Stop (on error) walks the hosts that did start.
	l.Hosts = slices.DeleteFunc(l.Hosts, func(h *Host) bool { return h == nil })
	if err != nil {
		return nil, err
	}
	return l, nil
}

// startHost writes host i's seed (the shared seed plus its extra qubes) and starts it.
// hostID is the id of host i of a lab.
func hostID(i int) string { return fmt.Sprintf("host-%02d", i+1) }

func startHost(ctx context.Context, cfg Config, seed *config.Config, i int, url, keyDir string, inProcess *server.Server, log *slog.Logger) (*Host, error) {
	id := hostID(i)
	dir := filepath.Join(cfg.Dir, id)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	seedFile := filepath.Join(dir, "seed.xml")
	conf, err := Generate(seed, id, cfg.Qubes)
	if err != nil {
		return nil, err
	}
	if err := qubesxml.Save(seedFile, conf); err != nil {
		return nil, err
	}
	hostURL := url
	if len(cfg.URLs) > 0 {
		hostURL = cfg.URLs[i%len(cfg.URLs)]
	}
	var reg prometheus.Registerer
	if cfg.Metrics != nil {
		reg = prometheus.WrapRegistererWith(prometheus.Labels{"host": id}, cfg.Metrics)
	}
	sys, err := system.Start(ctx, system.Config{
		Socket: filepath.Join(dir, "qubesd.sock"), DataDir: filepath.Join(dir, "data"),
		QubesXML: seedFile, HostID: id, NATSURL: hostURL, Replicas: cfg.Replicas, NKeyDir: keyDir,
		Metrics: reg, InProcess: inProcess, StreamsReady: true, LeaseTTL: cfg.LeaseTTL,
	}, log.With("host", id))
	if err != nil {
		return nil, fmt.Errorf("host %s: %w", id, err)
	}
	return &Host{ID: id, Socket: sys.Socket, System: sys}, nil
}

// Ready is the readiness of every host, each check named after its host.
func (l *Lab) Ready(ctx context.Context) []system.Check {
	var out []system.Check
	for _, h := range l.Hosts {
		for _, c := range h.System.Ready(ctx) {
			c.Name = h.ID + " " + c.Name
			out = append(out, c)
		}
	}
	return out
}

// Stop stops every host, then the embedded server.
func (l *Lab) Stop() error {
	var errs []error
	for _, h := range l.Hosts {
		errs = append(errs, h.Stop())
	}
	if l.NATS != nil {
		l.NATS.Shutdown()
		l.NATS.WaitForShutdown()
	}
	return errors.Join(errs...)
}

// first is url, or the first of urls when they spread the hosts.
func first(url string, urls []string) string {
	if len(urls) > 0 {
		return urls[0]
	}
	return url
}
