// Package bus is the NATS plumbing every qubesbus service shares: connecting, the
// embedded server (package embedded), subjects (subject), the call envelope (envelope),
// exceptions (qerr) and the method registry (rpc).
package bus

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go"
)

// ConnConfig says how a service reaches NATS.
type ConnConfig struct {
	URL   string // nats://…; empty with InProcess set
	Creds string // optional credentials file
	// NKeySeed is the seed file of an nkey user (access.Keys: a role of qubesbus).
	NKeySeed string
	// User and Password, for servers with per-service users (deploy/nats).
	User, Password string
	Name           string // client name shown by the server
	// InProcess, if set, connects without TCP to an embedded server.
	InProcess nats.InProcessConnProvider
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

// Connect opens a NATS connection that reconnects forever by default and logs its
// state changes. It fails if the server cannot be reached before ctx ends.
func Connect(ctx context.Context, cfg ConnConfig, log *slog.Logger) (*nats.Conn, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("nats config: %w", err)
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
	if cfg.InProcess != nil {
		opts = append(opts, nats.InProcessServer(cfg.InProcess))
	}
	if cfg.TLS.enabled() {
		opts = append(opts, nats.Secure())
		if cfg.TLS.CA != "" {
			opts = append(opts, nats.RootCAs(cfg.TLS.CA))
		}
		if cfg.TLS.Cert != "" {
			opts = append(opts, nats.ClientCert(cfg.TLS.Cert, cfg.TLS.Key))
		}
	}
	if dl, ok := ctx.Deadline(); ok {
		opts = append(opts, nats.Timeout(time.Until(dl)))
	}
	nc, err := nats.Connect(cfg.URL, opts...)
	if err != nil {
		return nil, fmt.Errorf("connect to nats as %s: %w", cfg.Name, err)
	}
	return nc, nil
}
