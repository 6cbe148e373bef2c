// Package persistence owns a host's configuration: it loads qubes.xml, serves it to the
// other services over NATS, and writes it back after calls that change config.
package persistence

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/schemas/config"
	"github.com/qubesbus/qubesbus/services/persistence/qubesxml"
)

// Config of the persistence service.
type Config struct {
	Host    subject.Host
	DataDir string // holds qubes.xml
	// SeedXML is copied to DataDir/qubes.xml when that does not exist yet; the seed
	// itself is never modified.
	SeedXML string
}

// Validate reports every problem at once.
func (c Config) Validate() error {
	var errs []error
	if c.DataDir == "" {
		errs = append(errs, errors.New("no data dir"))
	}
	return errors.Join(errs...)
}

// Snapshot is the whole configuration at one revision.
type Snapshot struct {
	Revision uint64         `json:"revision"`
	Config   *config.Config `json:"config"`
}

// Store is the persistence service of one host.
type Store struct {
	cfg  Config
	log  *slog.Logger
	path string

	mu     sync.RWMutex
	conf   *config.Config
	rev    uint64
	writes uint64
}

// Open loads the host's qubes.xml, seeding it first if needed.
func Open(cfg Config, log *slog.Logger) (*Store, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("persistence config: %w", err)
	}
	if err := os.MkdirAll(cfg.DataDir, 0o770); err != nil {
		return nil, fmt.Errorf("data dir: %w", err)
	}
	path := filepath.Join(cfg.DataDir, "qubes.xml")
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		if cfg.SeedXML == "" {
			return nil, fmt.Errorf("qubes XML store %q is missing and no seed was given", path)
		}
		if err := copyFile(cfg.SeedXML, path); err != nil {
			return nil, fmt.Errorf("seed qubes.xml: %w", err)
		}
		log.Info("seeded qubes.xml", "from", cfg.SeedXML, "to", path)
	}
	conf, err := qubesxml.Load(path)
	if err != nil {
		return nil, err
	}
	return &Store{cfg: cfg, log: log, path: path, conf: conf, rev: 1}, nil
}

// Snapshot returns a deep copy of the configuration and its revision.
func (s *Store) Snapshot() Snapshot {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return Snapshot{Revision: s.rev, Config: s.conf.Clone()}
}

// Writes is how often qubes.xml was written since Open.
func (s *Store) Writes() uint64 {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.writes
}

// Save writes qubes.xml atomically.
func (s *Store) Save() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := qubesxml.Save(s.path, s.conf); err != nil {
		return fmt.Errorf("save qubes.xml: %w", err)
	}
	s.writes++
	return nil
}

// Serve answers the store API on nc until the returned service is stopped.
func (s *Store) Serve(ctx context.Context, nc *nats.Conn, version string) (micro.Service, error) {
	svc, err := micro.AddService(nc, micro.Config{
		Name: "qubesbus-persistence", Version: version,
		Description: "qubesbus configuration store", QueueGroup: "qubesbus-persistence",
		Metadata: map[string]string{"host": s.cfg.Host.ID()},
	})
	if err != nil {
		return nil, fmt.Errorf("add persistence service: %w", err)
	}
	err = svc.AddEndpoint("snapshot", micro.HandlerFunc(func(r micro.Request) {
		b, err := json.Marshal(s.Snapshot())
		if err != nil {
			_ = r.Error("500", err.Error(), nil)
			return
		}
		_ = r.Respond(b)
	}), micro.WithEndpointSubject(s.cfg.Host.Store("snapshot")))
	if err != nil {
		_ = svc.Stop()
		return nil, fmt.Errorf("add snapshot endpoint: %w", err)
	}
	if err := nc.FlushTimeout(10 * time.Second); err != nil {
		_ = svc.Stop()
		return nil, fmt.Errorf("flush: %w", err)
	}
	return svc, nil
}

// FetchSnapshot asks the persistence service of a host for its configuration.
func FetchSnapshot(ctx context.Context, nc *nats.Conn, host subject.Host) (Snapshot, error) {
	msg, err := nc.RequestWithContext(ctx, host.Store("snapshot"), nil)
	if err != nil {
		return Snapshot{}, fmt.Errorf("fetch config snapshot: %w", err)
	}
	if code := msg.Header.Get(micro.ErrorCodeHeader); code != "" {
		return Snapshot{}, fmt.Errorf("fetch config snapshot: %s %s", code, msg.Header.Get(micro.ErrorHeader))
	}
	var snap Snapshot
	if err := json.Unmarshal(msg.Data, &snap); err != nil {
		return Snapshot{}, fmt.Errorf("decode config snapshot: %w", err)
	}
	return snap, nil
}

func copyFile(from, to string) error {
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	tmp := to + ".seed"
	out, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o660)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	if err := out.Sync(); err != nil {
		out.Close()
		return err
	}
	if err := out.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, to)
}
