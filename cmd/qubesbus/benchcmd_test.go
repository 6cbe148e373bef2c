package main

import (
	"context"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/system"
)

// askSocket makes one call the way qubesadmin does (write, half-close, read to EOF).
func askSocket(t *testing.T, sock, req string) string {
	t.Helper()
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := io.WriteString(c, req); err != nil {
		t.Fatal(err)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestServeFloor: `bench --serve-floor` answers the reads it recorded from a running
// qubesbus byte for byte as qubesbus does, aborts a call it did not record, and
// stops at the end of its context with exit 0, its socket gone.
func TestServeFloor(t *testing.T) {
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	sys, err := system.Start(ctx, system.Config{Socket: filepath.Join(dir, "qubesd.sock"), DataDir: filepath.Join(dir, "data"),
		QubesXML: "../../testdata/qubes.xml", HostID: "floortest"}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer sys.Stop()

	floor := filepath.Join(dir, "floor.sock")
	fctx, stop := context.WithCancel(ctx)
	defer stop()
	stderr := &lineWriter{lines: make(chan string, 10)}
	exited := make(chan int, 1)
	go func() {
		exited <- dispatch(fctx, []string{"bench", "--serve-floor", floor, "--floor-from", sys.Socket}, strings.NewReader(""), io.Discard, stderr)
	}()
	select {
	case line := <-stderr.lines:
		// 1 property.Get, 1 admin.vm.List, 9 GetAll
		if want := "floor ready: 11 recorded calls on " + floor; line != want {
			t.Fatalf("stderr: %q, want %q", line, want)
		}
	case code := <-exited:
		t.Fatalf("exited %d before it was ready", code)
	case <-ctx.Done():
		t.Fatal("no ready line")
	}

	for _, req := range []string{
		"admin.vm.property.Get+label dom0 name work\x00",
		"admin.vm.List+ dom0 name dom0\x00",
		"admin.vm.property.GetAll+ dom0 name sys-net\x00",
		"admin.vm.property.GetAll+ dom0 name dom0\x00",
	} {
		want := askSocket(t, sys.Socket, req)
		if len(want) < 3 || !strings.HasPrefix(want, "0\x00") {
			t.Fatalf("qubesbus answered %.40q with %.60q", req, want)
		}
		if got := askSocket(t, floor, req); got != want {
			t.Errorf("%.40q: floor answered %q, qubesbus %q", req, got, want)
		}
	}
	if got := askSocket(t, floor, "admin.vm.property.Get+netvm dom0 name work\x00"); got != "" {
		t.Errorf("a call not recorded: %q, want an abort (empty)", got)
	}

	stop()
	select {
	case code := <-exited:
		if code != 0 {
			t.Errorf("exit %d after its context ended", code)
		}
	case <-ctx.Done():
		t.Fatal("did not stop")
	}
	if _, err := net.Dial("unix", floor); err == nil {
		t.Error("the floor socket still answers after the floor stopped")
	}
}
