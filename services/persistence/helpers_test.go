package persistence

import (
	"context"
	"fmt"
	"net/url"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/embedded"
	"github.com/qubesbus/qubesbus/schemas/config"
	"github.com/qubesbus/qubesbus/services/persistence/checkpoint"
)

// startServer runs a JetStream server on storeDir and port (-1: any), so a test can
// stop it and start another on the same store and port.
func startServer(t *testing.T, storeDir string, port int) *server.Server {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ns, err := embedded.Start(ctx, embedded.Config{StoreDir: storeDir, Port: port})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ns.Shutdown()
		ns.WaitForShutdown()
	})
	return ns
}

func portOf(t *testing.T, clientURL string) int {
	t.Helper()
	u, err := url.Parse(clientURL)
	if err != nil {
		t.Fatal(err)
	}
	p, err := strconv.Atoi(u.Port())
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// loadCheckpoint loads qubes.xml the way a starting instance does: it must parse and
// match its marker.
func loadCheckpoint(dir string) (*config.Config, checkpoint.Mark, error) {
	return checkpoint.New(filepath.Join(dir, "qubes.xml")).Load("")
}

// Snapshot is a deep copy of the configuration and its revision (a zero Snapshot while
// none is known).
func (s *Store) Snapshot() Snapshot {
	v := s.view()
	if v.Config != nil {
		v.Config = v.Config.Clone()
	}
	return v
}

// Writes is how often this instance wrote qubes.xml since Open.
func (s *Store) Writes() uint64 { return s.writes.Load() }

// Save writes qubes.xml now if it does not hold the current revision yet.
func (s *Store) Save() error { return s.flush.wait(context.Background()) }

// WaitWritten returns once qubes.xml holds revision rev or later, without asking for
// a write, or when ctx ends.
func (s *Store) WaitWritten(ctx context.Context, rev uint64) error {
	for s.written.Load() < rev {
		if err := bus.Sleep(ctx, time.Millisecond); err != nil {
			return fmt.Errorf("qubes.xml at revision %d, waiting for %d: %w", s.written.Load(), rev, err)
		}
	}
	return nil
}
