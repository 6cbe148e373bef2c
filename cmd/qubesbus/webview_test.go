package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/system"
)

// TestRunServesTheWebView: `run --http` serves the web view at / beside the
// operators' endpoints, and stops promptly even with a page's streams open.
func TestRunServesTheWebView(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	dir := t.TempDir()
	cfg := system.Config{Socket: filepath.Join(dir, "qubesd.sock"), DataDir: filepath.Join(dir, "data"),
		QubesXML: "../../testdata/qubes.xml", HostID: "local"}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- runWithOps(ctx, cfg, addr, slog.New(slog.DiscardHandler)) }()

	get := func(path string) (int, string, error) {
		resp, err := http.Get("http://" + addr + path)
		if err != nil {
			return 0, "", err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b), err
	}
	bustest.CheckFor(t, lineWait, 50*time.Millisecond, func() error {
		code, body, err := get("/api/hosts")
		if err != nil {
			return err
		}
		if code != 200 || !strings.Contains(body, `"id":"local"`) || !strings.Contains(body, `"name":"work"`) {
			return fmt.Errorf("/api/hosts: %d %s", code, body)
		}
		return nil
	})
	if code, body, err := get("/"); err != nil || code != 200 || !strings.Contains(body, "<title>qubesbus</title>") {
		t.Errorf("/: %d %v %.200s", code, err, body)
	}
	if code, body, err := get("/healthz"); err != nil || code != 200 || body != "ok\n" {
		t.Errorf("/healthz: %d %v %q", code, err, body)
	}
	if code, _, err := get("/metrics"); err != nil || code != 200 {
		t.Errorf("/metrics: %d %v", code, err)
	}

	// Streams a page keeps open must not hold the shutdown up.
	for _, path := range []string{"/state", "/events"} {
		resp, err := http.Get("http://" + addr + path)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("%s: %v %v", path, resp, err)
		}
		defer resp.Body.Close()
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("run: %v", err)
		}
	case <-time.After(promptly):
		t.Fatal("run did not stop with the web view's streams open")
	}
}
