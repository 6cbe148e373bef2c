package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/nats-io/nats.go"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/access"
)

// streamClient is how the commands that read a stream (events, audit) reach NATS: as
// a read-only role, with its key from `qubesbus run`'s data dir unless other
// credentials are given.
type streamClient struct {
	NATSURL string
	Creds   string
	User    string
	NKey    string // seed file of an nkey user
	DataDir string // where `qubesbus run` keeps its keys
	TLS     bus.TLSFiles
}

// flags registers the connection flags; role names the default key and the user
// the help suggests.
func (c *streamClient) flags(fs *flag.FlagSet, role string) {
	fs.StringVar(&c.NATSURL, "nats-url", envOr("QUBESBUS_NATS_URL", "nats://127.0.0.1:4222"), "NATS server (QUBESBUS_NATS_URL)")
	fs.StringVar(&c.Creds, "nats-creds", envOr("QUBESBUS_NATS_CREDS", ""), "NATS credentials file")
	fs.StringVar(&c.User, "nats-user", envOr("QUBESBUS_NATS_USER", ""), "NATS user, e.g. "+role+" (QUBESBUS_NATS_USER; password from QUBESBUS_NATS_PASSWORD)")
	fs.StringVar(&c.NKey, "nats-nkey", envOr("QUBESBUS_NATS_NKEY", ""), "nkey seed file (QUBESBUS_NATS_NKEY); default: the "+role+" role's key in --data-dir, when no other credentials are given")
	fs.StringVar(&c.DataDir, "data-dir", envOr("QUBESBUS_DATA_DIR", "run/data"), "data dir of `qubesbus run`, whose nkeys/"+role+".nk is the default key (QUBESBUS_DATA_DIR)")
	fs.StringVar(&c.TLS.CA, "nats-tls-ca", envOr("QUBESBUS_NATS_TLS_CA", ""), "PEM file of the NATS servers' CA; any TLS flag makes the connection use TLS")
	fs.StringVar(&c.TLS.Cert, "nats-tls-cert", envOr("QUBESBUS_NATS_TLS_CERT", ""), "PEM client certificate")
	fs.StringVar(&c.TLS.Key, "nats-tls-key", envOr("QUBESBUS_NATS_TLS_KEY", ""), "PEM key of the client certificate")
}

// connect connects as role. Refused without any credentials, the error says where
// the role's key was looked for.
func (c streamClient) connect(ctx context.Context, role string, log *slog.Logger) (*nats.Conn, error) {
	seed := defaultNKey(c.NKey, c.Creds, c.User, c.DataDir, role)
	nc, err := bus.Connect(ctx, bus.ConnConfig{URL: c.NATSURL, Creds: c.Creds, User: c.User, Password: os.Getenv("QUBESBUS_NATS_PASSWORD"),
		NKeySeed: seed, InboxPrefix: access.InboxPrefix(role), TLS: c.TLS,
		Name: "qubesbus-" + role}, log)
	if err != nil && errors.Is(err, nats.ErrAuthorization) && seed == "" && c.Creds == "" && c.User == "" {
		return nil, fmt.Errorf("%w (no credentials: no key %s; give --data-dir of the run, --nats-nkey, --nats-creds or --nats-user)",
			err, access.SeedFile(filepath.Join(c.DataDir, "nkeys"), role))
	}
	return nc, err
}
