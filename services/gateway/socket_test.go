package gateway

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestListenModeAndStaleSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "qubesd.sock")
	// A stale socket: bound once, its listener gone without unlinking it.
	stale, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	stale.SetUnlinkOnClose(false)
	stale.Close()
	if _, err := os.Lstat(path); err != nil {
		t.Fatalf("stale socket not left behind: %v", err)
	}

	l, err := Listen(path, "")
	if err != nil {
		t.Fatalf("Listen over a stale socket: %v", err)
	}
	defer l.Close()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o660 {
		t.Fatalf("socket mode %v, want socket 0660", fi.Mode())
	}

	// A live daemon on the path: refuse, and leave its socket alone.
	_, err = Listen(path, "")
	if !errors.Is(err, ErrSocketInUse) || !strings.Contains(err.Error(), "socket already exists: '"+path+"'") {
		t.Fatalf("second Listen: %v", err)
	}
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatalf("live socket was removed: %v", err)
	}
	c.Close()
}

func TestListenRefusesNonSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "qubesd.sock")
	if err := os.WriteFile(path, []byte("not a socket"), 0o600); err != nil {
		t.Fatal(err)
	}
	if l, err := Listen(path, ""); err == nil {
		l.Close()
		t.Fatal("Listen replaced a regular file")
	}
	if b, _ := os.ReadFile(path); string(b) != "not a socket" {
		t.Fatal("regular file in the socket path was modified")
	}
}
