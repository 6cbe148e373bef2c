package embedded

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
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

// HTTP opens nats-server's monitoring endpoint: /varz and /jsz answer there. Unset,
// the server has no monitoring listener.
func TestMonitoring(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ns, err := Start(ctx, Config{StoreDir: t.TempDir(), DontListen: true, HTTP: "127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Shutdown()
	addr := ns.MonitorAddr()
	if addr == nil {
		t.Fatal("no monitoring listener")
	}
	for path, want := range map[string]string{"/varz": `"server_id"`, "/jsz": `"streams"`, "/connz": `"connections"`} {
		resp, err := http.Get("http://" + addr.String() + path)
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusOK || !strings.Contains(string(b), want) {
			t.Errorf("%s: %d %v %.200s", path, resp.StatusCode, err, b)
		}
	}

	off, err := Start(ctx, Config{StoreDir: t.TempDir(), DontListen: true})
	if err != nil {
		t.Fatal(err)
	}
	defer off.Shutdown()
	if a := off.MonitorAddr(); a != nil {
		t.Errorf("monitoring on %s without HTTP", a)
	}
}

func TestMonitoringAddress(t *testing.T) {
	for _, addr := range []string{"9090", "127.0.0.1:x", "127.0.0.1:70000"} {
		err := Config{StoreDir: "d", HTTP: addr}.Validate()
		if !errors.Is(err, ErrMonitorAddr) {
			t.Errorf("%q: %v, want ErrMonitorAddr", addr, err)
		}
	}
	if err := (Config{StoreDir: "d", HTTP: ":8222"}).Validate(); err != nil {
		t.Errorf(":8222: %v", err)
	}
}
