// Package embedded runs a nats-server with JetStream inside the process, for
// `qubesbus run` and for tests.
package embedded

import (
	"context"
	"errors"
	"fmt"
	"net/url"
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
	go ns.Start()
	wait := 10 * time.Second
	if dl, ok := ctx.Deadline(); ok {
		wait = time.Until(dl)
	}
	// Short steps, so that ctx ending stops the wait and not only its deadline.
	start := time.Now()
	for !ns.ReadyForConnections(50 * time.Millisecond) {
		if err := ctx.Err(); err != nil {
			ns.Shutdown()
			return nil, fmt.Errorf("nats server not ready: %w", err)
		}
		if time.Since(start) >= wait {
			ns.Shutdown()
			return nil, fmt.Errorf("nats server not ready after %s", wait)
		}
	}
	return ns, nil
}
