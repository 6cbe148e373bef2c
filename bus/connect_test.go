package bus_test

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/qubesbus/qubesbus/bus"
)

var quiet = slog.New(slog.DiscardHandler)

// A first connection that cannot succeed fails within seconds and names the URL or
// the file: a refused port, an unresolvable host, a server that never speaks, a
// missing credentials file; and it ends when ctx does.
func TestConnectFailsFastNamingWhat(t *testing.T) {
	silent, err := net.Listen("tcp", "127.0.0.1:0") // accepts, never sends INFO
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	go func() {
		for {
			c, err := silent.Accept()
			if err != nil {
				return
			}
			defer c.Close()
		}
	}()
	missing := filepath.Join(t.TempDir(), "nonexistent.creds")
	for _, tc := range []struct {
		name string
		cfg  bus.ConnConfig
		want string
	}{
		{"refused", bus.ConnConfig{URL: "nats://127.0.0.1:1"}, "nats://127.0.0.1:1"},
		{"unresolvable", bus.ConnConfig{URL: "nats://nosuch.invalid:4222"}, "nats://nosuch.invalid:4222"},
		{"silent", bus.ConnConfig{URL: "nats://" + silent.Addr().String(), ConnectTimeout: time.Second}, silent.Addr().String()},
		{"creds", bus.ConnConfig{URL: "nats://127.0.0.1:1", Creds: missing}, missing},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.cfg.Name = "test"
			start := time.Now()
			nc, err := bus.Connect(context.Background(), tc.cfg, quiet)
			if err == nil {
				nc.Close()
				t.Fatal("connected")
			}
			if took := time.Since(start); took > 15*time.Second {
				t.Errorf("failed after %s", took)
			}
			t.Log(err)
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not name %q", err, tc.want)
			}
		})
	}

	ctx, cancel := context.WithCancel(context.Background())
	res := make(chan error, 1)
	go func() {
		nc, err := bus.Connect(ctx, bus.ConnConfig{URL: "nats://" + silent.Addr().String(), Name: "test", ConnectTimeout: time.Hour}, quiet)
		if nc != nil {
			nc.Close()
		}
		res <- err
	}()
	cancel()
	select {
	case err := <-res:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("after cancel: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Connect did not return when ctx ended")
	}
}

// The URL in errors and logs keeps no password or token.
func TestRedactURL(t *testing.T) {
	for in, want := range map[string]string{
		"nats://127.0.0.1:4222":                     "nats://127.0.0.1:4222",
		"nats://u:secret@h:4222,nats://tok@h2:4222": "nats://u:xxxxx@h:4222,nats://xxxxx@h2:4222",
		"nats://u:se%zzcret@h:4222":                 "nats://xxxxx@h:4222",
	} {
		if got := bus.RedactURL(in); got != want {
			t.Errorf("RedactURL(%q) = %q, want %q", in, got, want)
		}
	}
}
