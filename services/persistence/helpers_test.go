package persistence

import (
	"context"
	"net/url"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"

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
