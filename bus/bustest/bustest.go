// Package bustest runs real NATS servers for tests: embedded, with JetStream in a
// temporary directory, shut down (and waited for) when the test ends.
package bustest

import (
	"context"
	"fmt"
	"log/slog"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/embedded"
)

// RunJetStream starts a single JetStream server on a free loopback port.
func RunJetStream(t testing.TB) *server.Server {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ns, err := embedded.Start(ctx, embedded.Config{StoreDir: t.TempDir(), Port: -1})
	if err != nil {
		t.Fatalf("start nats: %v", err)
	}
	t.Cleanup(func() {
		ns.Shutdown()
		ns.WaitForShutdown()
	})
	return ns
}

// RunCluster starts n clustered JetStream servers on free loopback ports and waits
// until JetStream has a meta leader.
func RunCluster(t testing.TB, n int) []*server.Server {
	t.Helper()
	// Route ports must be known before the servers start, so they are picked free and
	// may be taken by a parallel test in between: then start the cluster again on
	// fresh ports.
	var servers []*server.Server
	var err error
	for attempt := 1; ; attempt++ {
		if servers, err = startCluster(t, n); err == nil {
			break
		}
		if attempt == 3 {
			t.Fatalf("start cluster: %v", err)
		}
		t.Logf("start cluster (attempt %d): %v; retrying on fresh ports", attempt, err)
	}
	for _, ns := range servers {
		t.Cleanup(func() {
			ns.Shutdown()
			ns.WaitForShutdown()
		})
	}
	nc := Connect(t, servers[0])
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatalf("jetstream: %v", err)
	}
	// JetStream answers account info only once the cluster has a meta leader.
	CheckFor(t, 30*time.Second, 100*time.Millisecond, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_, err := js.AccountInfo(ctx)
		return err
	})
	return servers
}

// startCluster starts n clustered servers, or none: on error those started are stopped.
func startCluster(t testing.TB, n int) ([]*server.Server, error) {
	ports := make([]int, n)
	for i := range ports {
		ports[i] = freePort(t)
	}
	servers := make([]*server.Server, 0, n)
	for i := 0; i < n; i++ {
		var routes []string
		for j, p := range ports {
			if j != i {
				routes = append(routes, fmt.Sprintf("nats-route://127.0.0.1:%d", p))
			}
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		ns, err := embedded.Start(ctx, embedded.Config{
			StoreDir: t.TempDir(), Port: -1, ServerName: fmt.Sprintf("n%d", i),
			ClusterName: "qubesbus-test", ClusterPort: ports[i], Routes: routes,
		})
		cancel()
		if err != nil {
			for _, s := range servers {
				s.Shutdown()
				s.WaitForShutdown()
			}
			return nil, fmt.Errorf("node %d: %w", i, err)
		}
		servers = append(servers, ns)
	}
	return servers, nil
}

// Connect opens a client connection to ns, closed when the test ends.
func Connect(t testing.TB, ns *server.Server) *nats.Conn {
	t.Helper()
	nc, err := bus.Connect(context.Background(), bus.ConnConfig{URL: ns.ClientURL(), Name: t.Name()}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// CheckFor polls f until it returns nil or timeout passes, then fails the test with
// f's last error. Tests poll for a state instead of sleeping for it.
func CheckFor(t testing.TB, timeout, interval time.Duration, f func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var err error
	for {
		if err = f(); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("condition not met after %s: %v", timeout, err)
		}
		time.Sleep(interval)
	}
}
