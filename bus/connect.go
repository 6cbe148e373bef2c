// Package bus is the NATS plumbing every qubesbus service shares: connecting, the
// embedded server (package embedded), subjects (subject), the call envelope (envelope),
// exceptions (qerr) and the method registry (rpc).
package bus

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
)

// ConnConfig says how a service reaches NATS.
type ConnConfig struct {
	URL   string // nats://…; empty with InProcess set
	Creds string // optional credentials file
	// NKeySeed is the seed file of an nkey user (access.Keys: a role of qubesbus).
	NKeySeed string
	// InboxPrefix replaces _INBOX for the connection's reply subjects: a role may
	// receive replies only on its own (access.InboxPrefix).
	InboxPrefix string
	// User and Password, for servers with per-service users (deploy/nats).
	User, Password string
	Name           string // client name shown by the server
	// InProcess, if set, connects without TCP to an embedded server.
	InProcess nats.InProcessConnProvider
	// ConnectTimeout bounds the first connection (zero: DefaultConnectTimeout; ctx's
	// deadline if sooner): a refused or silent address, an unresolvable host or a
	// refused user fails within it. Once connected, a connection lost is reconnected
	// as ReconnectWait and MaxReconnects say.
	ConnectTimeout time.Duration
	// ReconnectWait between attempts; MaxReconnects < 0 retries forever.
	ReconnectWait time.Duration
	MaxReconnects int
	// TLS, if any file is set, makes the connection use TLS.
	TLS TLSFiles
}

// TLSFiles are PEM files for a TLS connection to NATS.
type TLSFiles struct {
	CA        string // trusted roots for the server's certificate (default: the system's)
	Cert, Key string // a client certificate, for servers that verify clients
}

func (t TLSFiles) enabled() bool { return t.CA != "" || t.Cert != "" || t.Key != "" }

// Validate reports every problem of the configuration at once.
func (c ConnConfig) Validate() error {
	var errs []error
	if c.URL == "" && c.InProcess == nil {
		errs = append(errs, errors.New("no NATS URL"))
	}
	if c.Name == "" {
		errs = append(errs, errors.New("no client name"))
	}
	if (c.TLS.Cert == "") != (c.TLS.Key == "") {
		errs = append(errs, errors.New("a TLS client certificate needs both a cert and a key file"))
	}
	return errors.Join(errs...)
}

// DefaultConnectTimeout bounds a first connection to NATS.
const DefaultConnectTimeout = 5 * time.Second

// Connect opens a NATS connection that reconnects forever by default and logs its
// state changes. The first connection is one pass over the servers: it fails, naming
// the URL, if none answers within cfg.ConnectTimeout or before ctx ends.
func Connect(ctx context.Context, cfg ConnConfig, log *slog.Logger) (*nats.Conn, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("nats config: %w", err)
	}
	// nats.go reads a credentials file only while connecting, and says which file
	// only sometimes.
	if cfg.Creds != "" {
		f, err := os.Open(cfg.Creds)
		if err != nil {
			return nil, fmt.Errorf("nats credentials: %w", err)
		}
		f.Close()
	}
	timeout := cfg.ConnectTimeout
	if timeout <= 0 {
		timeout = DefaultConnectTimeout
	}
	if dl, ok := ctx.Deadline(); ok && time.Until(dl) < timeout {
		timeout = time.Until(dl)
	}
	where := RedactURL(cfg.URL)
	if cfg.InProcess != nil {
		where = "in-process " + where
	}
	if err := ctx.Err(); err != nil || timeout <= 0 {
		if err == nil {
			err = context.DeadlineExceeded
		}
		return nil, fmt.Errorf("connect to nats %s as %s: %w", where, cfg.Name, err)
	}
	if cfg.ReconnectWait == 0 {
		cfg.ReconnectWait = 250 * time.Millisecond
	}
	if cfg.MaxReconnects == 0 {
		cfg.MaxReconnects = -1
	}
	opts := []nats.Option{
		nats.Name(cfg.Name),
		nats.ReconnectWait(cfg.ReconnectWait),
		nats.MaxReconnects(cfg.MaxReconnects),
		nats.RetryOnFailedConnect(false),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				log.Warn("nats disconnected", "name", cfg.Name, "err", err)
			}
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) {
			log.Info("nats reconnected", "name", cfg.Name, "url", nc.ConnectedUrlRedacted())
		}),
		nats.ErrorHandler(func(_ *nats.Conn, sub *nats.Subscription, err error) {
			subj := ""
			if sub != nil {
				subj = sub.Subject
			}
			log.Error("nats async error", "name", cfg.Name, "subject", subj, "err", err)
		}),
	}
	if cfg.User != "" {
		opts = append(opts, nats.UserInfo(cfg.User, cfg.Password))
	}
	if cfg.Creds != "" {
		opts = append(opts, nats.UserCredentials(cfg.Creds))
	}
	if cfg.NKeySeed != "" {
		opt, err := nats.NkeyOptionFromSeed(cfg.NKeySeed)
		if err != nil {
			return nil, fmt.Errorf("nats nkey %s: %w", cfg.NKeySeed, err)
		}
		opts = append(opts, opt)
	}
	if cfg.InboxPrefix != "" {
		opts = append(opts, nats.CustomInboxPrefix(cfg.InboxPrefix))
	}
	// A message whose protocol line the server would refuse is dropped before it is
	// sent (lineGuard): the server would close the connection, and nats.go does not
	// reconnect after that error.
	onDrop := func(op string, line []byte, size int) {
		log.Error("nats message dropped: its protocol line is longer than the server accepts",
			"name", cfg.Name, "op", op, "start", string(line), "max", MaxControlLine, "payload", size)
	}
	if cfg.InProcess != nil {
		opts = append(opts, nats.InProcessServer(guardedProvider{p: cfg.InProcess, onDrop: onDrop}))
	} else {
		// TLS too: the dialer does it, so the guard sees the protocol above it.
		d, err := newGuardedDialer(timeout, cfg.URL, cfg.TLS, onDrop)
		if err != nil {
			return nil, fmt.Errorf("connect to nats %s as %s: %w", where, cfg.Name, err)
		}
		opts = append(opts, nats.SetCustomDialer(d))
		if cfg.TLS.enabled() {
			// Secure: a server without TLS is refused. The files also go to nats.go,
			// which secures websocket connections (wss) itself.
			opts = append(opts, nats.Secure())
			if cfg.TLS.CA != "" {
				opts = append(opts, nats.RootCAs(cfg.TLS.CA))
			}
			if cfg.TLS.Cert != "" {
				opts = append(opts, nats.ClientCert(cfg.TLS.Cert, cfg.TLS.Key))
			}
		}
	}
	// Each dial and handshake is bounded by the timeout; the whole pass (several
	// servers) and ctx are watched here, nats.Connect watching neither.
	opts = append(opts, nats.Timeout(timeout))
	type result struct {
		nc  *nats.Conn
		err error
	}
	done := make(chan result, 1)
	go func() {
		nc, err := nats.Connect(cfg.URL, opts...)
		done <- result{nc, err}
	}()
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	var err error
	select {
	case r := <-done:
		if r.err == nil {
			return r.nc, nil
		}
		err = r.err
	case <-timer.C:
		err = fmt.Errorf("no connection within %s", timeout)
	case <-ctx.Done():
		err = ctx.Err()
	}
	go func() { // a connection that comes too late is closed
		if r := <-done; r.nc != nil {
			r.nc.Close()
		}
	}()
	return nil, fmt.Errorf("connect to nats %s as %s: %w", where, cfg.Name, err)
}

// RedactURL is a NATS URL (or comma-separated list) with any password or token
// replaced, fit for logs and errors.
func RedactURL(urls string) string {
	parts := strings.Split(urls, ",")
	for i, p := range parts {
		p = strings.TrimSpace(p)
		u, err := url.Parse(p)
		switch {
		case err != nil:
			// Unparsable: keep nothing that may be a secret.
			if at := strings.LastIndex(p, "@"); at >= 0 {
				scheme, _, ok := strings.Cut(p, "://")
				if !ok {
					scheme = ""
				} else {
					scheme += "://"
				}
				p = scheme + "xxxxx" + p[at:]
			}
		case u.User != nil:
			if _, ok := u.User.Password(); ok {
				u.User = url.UserPassword(u.User.Username(), "xxxxx")
			} else {
				u.User = url.User("xxxxx") // a token
			}
			p = u.String()
		}
		parts[i] = p
	}
	return strings.Join(parts, ",")
}
