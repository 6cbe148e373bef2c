package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/access"
	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/system"
)

// envOr returns the QUBESBUS_* variable if set, else def.
func envOr(name, def string) string {
	if v, ok := os.LookupEnv(name); ok {
		return v
	}
	return def
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil {
		return v
	}
	return def
}

func envDuration(name string, def time.Duration) time.Duration {
	if v, err := time.ParseDuration(os.Getenv(name)); err == nil {
		return v
	}
	return def
}

// hostFlags are the flags every command that builds a host shares.
func hostFlags(fs *flag.FlagSet) *system.Config {
	c := setupFlags(fs)
	fs.StringVar(&c.Socket, "socket", envOr("QUBESBUS_SOCKET", "run/qubesd.sock"), "gateway socket path (QUBESBUS_SOCKET)")
	fs.StringVar(&c.SocketGroup, "socket-group", envOr("QUBESBUS_SOCKET_GROUP", ""), "group owning the socket (QUBESBUS_SOCKET_GROUP)")
	fs.StringVar(&c.QubesXML, "qubes-xml", envOr("QUBESBUS_QUBES_XML", ""), "qubes.xml copied into the data dir on first start (QUBESBUS_QUBES_XML)")
	fs.StringVar(&c.PolicyFile, "policy", envOr("QUBESBUS_POLICY", ""), "access rules, 'method +arg source target allow|deny' per line; without: only dom0 may call (QUBESBUS_POLICY)")
	fs.StringVar(&c.BackupProfiles, "backup-profiles", envOr("QUBESBUS_BACKUP_PROFILES", "/etc/qubes/backup"), "directory of backup profiles, <id>.conf as in dom0 (QUBESBUS_BACKUP_PROFILES)")
	fs.StringVar(&c.HostID, "host", envOr("QUBESBUS_HOST", "local"), "host id in subjects (QUBESBUS_HOST)")
	fs.IntVar(&c.NATSPort, "nats-port", envInt("QUBESBUS_NATS_PORT", 0), "open the embedded NATS on this TCP port of 127.0.0.1, -1 for any free one; 0 opens none (the services connect in-process). Clients need a role's key from <data-dir>/nkeys (QUBESBUS_NATS_PORT)")
	fs.DurationVar(&c.IdleTimeout, "idle-timeout", envDuration("QUBESBUS_IDLE_TIMEOUT", time.Minute), "longest a client may take to send its request, 0 for no limit (QUBESBUS_IDLE_TIMEOUT)")
	return c
}

// setupFlags are the flags of `qubesbus setup`: how to reach NATS, and the settings
// of the streams and buckets it creates.
func setupFlags(fs *flag.FlagSet) *system.Config {
	c := &system.Config{}
	fs.StringVar(&c.DataDir, "data-dir", envOr("QUBESBUS_DATA_DIR", "run/data"), "qubes.xml, JetStream store and the roles' nkeys (QUBESBUS_DATA_DIR)")
	fs.StringVar(&c.NATSURL, "nats-url", envOr("QUBESBUS_NATS_URL", ""), "external NATS server; empty runs an embedded one (QUBESBUS_NATS_URL)")
	fs.StringVar(&c.NATSCreds, "nats-creds", envOr("QUBESBUS_NATS_CREDS", ""), "NATS credentials file (QUBESBUS_NATS_CREDS)")
	fs.StringVar(&c.NATSUser, "nats-user", envOr("QUBESBUS_NATS_USER", ""), "NATS user (QUBESBUS_NATS_USER; password from QUBESBUS_NATS_PASSWORD)")
	c.NATSPass = os.Getenv("QUBESBUS_NATS_PASSWORD")
	fs.StringVar(&c.NATSTLS.CA, "nats-tls-ca", envOr("QUBESBUS_NATS_TLS_CA", ""), "PEM file of the CA that signed the NATS servers' certificates; any TLS flag makes the connection use TLS (QUBESBUS_NATS_TLS_CA)")
	fs.StringVar(&c.NATSTLS.Cert, "nats-tls-cert", envOr("QUBESBUS_NATS_TLS_CERT", ""), "PEM client certificate, for servers that verify clients (QUBESBUS_NATS_TLS_CERT)")
	fs.StringVar(&c.NATSTLS.Key, "nats-tls-key", envOr("QUBESBUS_NATS_TLS_KEY", ""), "PEM key of the client certificate (QUBESBUS_NATS_TLS_KEY)")
	fs.IntVar(&c.Replicas, "replicas", envInt("QUBESBUS_REPLICAS", 1), "JetStream replicas of the streams: 1, or 3 on a cluster (QUBESBUS_REPLICAS)")
	fs.DurationVar(&c.EventsMaxAge, "events-max-age", envDuration("QUBESBUS_EVENTS_MAX_AGE", 0), "keep events this long (default 24h) (QUBESBUS_EVENTS_MAX_AGE)")
	fs.Int64Var(&c.EventsMaxBytes, "events-max-bytes", int64(envInt("QUBESBUS_EVENTS_MAX_BYTES", 0)), "keep at most this many bytes of events (default 1 GiB) (QUBESBUS_EVENTS_MAX_BYTES)")
	fs.DurationVar(&c.AuditMaxAge, "audit-max-age", envDuration("QUBESBUS_AUDIT_MAX_AGE", 0), "keep audit records this long (default 2160h, 90 days) (QUBESBUS_AUDIT_MAX_AGE)")
	fs.Int64Var(&c.AuditMaxBytes, "audit-max-bytes", int64(envInt("QUBESBUS_AUDIT_MAX_BYTES", 0)), "keep at most this many bytes of audit records, oldest dropped first (default 1 GiB) (QUBESBUS_AUDIT_MAX_BYTES)")
	fs.DurationVar(&c.LeaseTTL, "lease-ttl", envDuration("QUBESBUS_LEASE_TTL", 0), "how long a dead vmlifecycle instance keeps the host's lease before a standby takes over (default 5s); set when the lease bucket is created (QUBESBUS_LEASE_TTL)")
	return c
}

func runCmd(ctx context.Context, args []string, log *slog.Logger, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cfg := hostFlags(fs)
	httpAddr := httpFlag(fs)
	natsHTTPFlag(fs, &cfg.NATSHTTP)
	if code, stop := parseFlags(fs, args, "run [flags]", stdout); stop {
		return code
	}
	if err := runWithOps(ctx, *cfg, *httpAddr, log); err != nil {
		fmt.Fprintln(stderr, "qubesbus:", err)
		return 1
	}
	return 0
}

// runWithOps is run with the operators' endpoints on httpAddr (none if empty).
func runWithOps(ctx context.Context, cfg system.Config, httpAddr string, log *slog.Logger) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	reg, ready, wait, err := startOps(ctx, httpAddr, log)
	if err != nil {
		return err
	}
	defer wait()
	cfg.Metrics = registerer(reg)
	return run(ctx, cfg, log, ready)
}

// run serves until ctx ends (SIGINT, SIGTERM), then stops cleanly. A signal during
// start-up stops what had started and is no error either: Ctrl-C on `make run` exits 0.
func run(ctx context.Context, cfg system.Config, log *slog.Logger, ready *readiness) error {
	sys, err := system.Start(ctx, cfg, log)
	if err != nil {
		if ctx.Err() != nil {
			log.Info("stopped during start-up", "cause", context.Cause(ctx), "err", err)
			return nil
		}
		return err
	}
	ready.set(sys.Ready)
	ready.startWeb(ctx, ready.serving, sys.ConnectAs, log)
	<-ctx.Done()
	log.Info("shutting down", "cause", context.Cause(ctx))
	return sys.Stop()
}

func serveCmd(ctx context.Context, args []string, log *slog.Logger, stdout, stderr io.Writer) int {
	synopsis := "serve <" + strings.Join(system.Services, "|") + "> --nats-url URLS [flags]"
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cfg := hostFlags(fs)
	httpAddr := httpFlag(fs)
	if len(args) == 0 || isHelp(args[0]) {
		if len(args) == 0 {
			printUsage(fs, synopsis, stderr)
			return 2
		}
		printUsage(fs, synopsis, stdout)
		return 0
	}
	if code, stop := parseFlags(fs, args[1:], synopsis, stdout); stop {
		return code
	}
	if cfg.NATSURL == "" {
		fmt.Fprintln(stderr, "qubesbus serve: --nats-url is required")
		return 2
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	reg, ready, wait, err := startOps(ctx, *httpAddr, log)
	if err != nil {
		fmt.Fprintln(stderr, "qubesbus:", err)
		return 1
	}
	defer wait()
	cfg.Metrics = registerer(reg)
	sys, err := system.StartService(ctx, args[0], *cfg, log)
	if err != nil {
		if ctx.Err() != nil { // a signal during start-up, as in run
			log.Info("stopped during start-up", "cause", context.Cause(ctx), "err", err)
			return 0
		}
		fmt.Fprintln(stderr, "qubesbus:", err)
		return 1
	}
	ready.set(sys.Ready)
	ready.startWeb(ctx, ready.serving, sys.ConnectAs, log)
	<-ctx.Done()
	if err := sys.Stop(); err != nil {
		fmt.Fprintln(stderr, "qubesbus:", err)
		return 1
	}
	return 0
}

// setupCmd creates what every service expects to exist (streams, buckets). Services
// running as their own NATS users may not create them; a deployment runs this once
// as an admin first.
func setupCmd(ctx context.Context, args []string, log *slog.Logger, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("setup", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cfg := setupFlags(fs)
	printPerms := fs.Bool("print-permissions", false, "print the NATS users and permissions of every role (deploy/nats/permissions.conf) and exit")
	permHosts := fs.String("hosts", "local", "with --print-permissions: the host ids whose services' durable consumers only their owners may touch, comma-separated")
	if code, stop := parseFlags(fs, args, "setup --nats-url URLS [flags]", stdout); stop {
		return code
	}
	if *printPerms {
		fmt.Fprint(stdout, access.Conf(strings.Split(*permHosts, ",")...))
		return 0
	}
	if cfg.NATSURL == "" {
		fmt.Fprintln(stderr, "qubesbus setup: --nats-url is required")
		return 2
	}
	if err := system.Setup(ctx, *cfg, log); err != nil {
		fmt.Fprintln(stderr, "qubesbus:", err)
		return 1
	}
	return 0
}
