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

// Change is one accepted mutation as the change feed carries it.
type Change struct {
	Revision uint64      `json:"revision"`
	Ops      []config.Op `json:"ops"`
}

// ApplyReply answers store.apply.
type ApplyReply struct {
	Revision uint64 `json:"revision,omitempty"`
	Error    string `json:"error,omitempty"`
	Code     string `json:"code,omitempty"` // "stale", "invalid"
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

	nc *nats.Conn // set by Serve; the change feed is published on it

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

// Apply applies a mutation atomically and returns its revision. The change is
// published on the host's change feed before Apply returns.
func (s *Store) Apply(ctx context.Context, m config.Mutation) (uint64, error) {
	s.mu.Lock()
	if m.ExpectRevision != 0 && m.ExpectRevision != s.rev {
		rev := s.rev
		s.mu.Unlock()
		return 0, fmt.Errorf("%w: expected %d, at %d", config.ErrStaleRevision, m.ExpectRevision, rev)
	}
	if err := config.Apply(s.conf, m.Ops); err != nil {
		s.mu.Unlock()
		return 0, err
	}
	s.rev++
	rev := s.rev
	var pubErr error
	if s.nc != nil {
		b, _ := json.Marshal(Change{Revision: rev, Ops: m.Ops})
		pubErr = s.nc.Publish(s.cfg.Host.Config(), b)
	}
	s.mu.Unlock()
	if pubErr != nil {
		return rev, fmt.Errorf("publish change %d: %w", rev, pubErr)
	}
	if m.ChangesConfig {
		if err := s.Save(); err != nil {
			return rev, err
		}
	}
	return rev, nil
}

// Serve answers the store API on nc until the returned service is stopped.
func (s *Store) Serve(ctx context.Context, nc *nats.Conn, version string) (micro.Service, error) {
	s.mu.Lock()
	s.nc = nc
	s.mu.Unlock()
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
	err = svc.AddEndpoint("apply", micro.HandlerFunc(func(r micro.Request) {
		var m config.Mutation
		var rep ApplyReply
		if err := json.Unmarshal(r.Data(), &m); err != nil {
			rep = ApplyReply{Error: err.Error(), Code: "invalid"}
		} else if rev, err := s.Apply(ctx, m); err != nil {
			rep = ApplyReply{Error: err.Error(), Code: "invalid"}
			if errors.Is(err, config.ErrStaleRevision) {
				rep.Code = "stale"
			}
		} else {
			rep.Revision = rev
		}
		_ = r.RespondJSON(rep)
	}), micro.WithEndpointSubject(s.cfg.Host.Store("apply")))
	if err != nil {
		_ = svc.Stop()
		return nil, fmt.Errorf("add apply endpoint: %w", err)
	}
	if err := nc.FlushTimeout(10 * time.Second); err != nil {
		_ = svc.Stop()
		return nil, fmt.Errorf("flush: %w", err)
	}
	return svc, nil
}

// Client is the other services' handle on a host's persistence service.
type Client struct {
	NC   *nats.Conn
	Host subject.Host
}

// ErrRejected wraps a mutation that persistence refused.
var ErrRejected = errors.New("mutation rejected")

// Apply sends a mutation and returns its revision.
func (c Client) Apply(ctx context.Context, m config.Mutation) (uint64, error) {
	b, err := json.Marshal(m)
	if err != nil {
		return 0, err
	}
	msg, err := c.NC.RequestWithContext(ctx, c.Host.Store("apply"), b)
	if err != nil {
		return 0, fmt.Errorf("apply mutation: %w", err)
	}
	var rep ApplyReply
	if err := json.Unmarshal(msg.Data, &rep); err != nil {
		return 0, fmt.Errorf("decode apply reply: %w", err)
	}
	switch {
	case rep.Code == "stale":
		return 0, fmt.Errorf("%w: %w: %s", ErrRejected, config.ErrStaleRevision, rep.Error)
	case rep.Error != "":
		return 0, fmt.Errorf("%w: %s", ErrRejected, rep.Error)
	}
	return rep.Revision, nil
}

// Snapshot fetches the whole configuration.
func (c Client) Snapshot(ctx context.Context) (Snapshot, error) {
	return FetchSnapshot(ctx, c.NC, c.Host)
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
