package embedded

import (
	"context"
	"errors"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"
)

// A taken client or cluster port fails the embedded server's start at once, naming
// the address.
func TestStartPortInUse(t *testing.T) {
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	port := taken.Addr().(*net.TCPAddr).Port
	for _, tc := range []struct {
		name string
		cfg  Config
		want string
	}{
		{"client", Config{Port: port}, "nats: listen " + taken.Addr().String() + ": "},
		{"cluster", Config{Port: -1, ServerName: "n1", ClusterName: "c", ClusterPort: port, Routes: []string{"nats-route://127.0.0.1:1"}}, "nats cluster: listen " + taken.Addr().String() + ": "},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.cfg.StoreDir = t.TempDir()
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			start := time.Now()
			ns, err := Start(ctx, tc.cfg)
			if err == nil {
				ns.Shutdown()
				t.Fatal("started on a taken port")
			}
			if took := time.Since(start); took > 15*time.Second {
				t.Errorf("failed after %s", took)
			}
			t.Log(err)
			if !strings.Contains(err.Error(), tc.want) || !errors.Is(err, syscall.EADDRINUSE) {
				t.Errorf("error %q: want %q and EADDRINUSE", err, tc.want)
			}
		})
	}
}
