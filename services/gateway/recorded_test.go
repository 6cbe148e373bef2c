package gateway

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"testing"
)

// A recording answers what it recorded with the same bytes, and aborts anything else.
func TestServeRecording(t *testing.T) {
	rec := NewRecording()
	get := "admin.vm.property.Get+label dom0 name work\x00"
	if err := rec.Add([]byte(get), []byte("0\x00default=False type=label red")); err != nil {
		t.Fatal(err)
	}
	missing := "admin.vm.property.Get+label dom0 name nosuch\x00"
	if err := rec.Add([]byte(missing), []byte("2\x00QubesVMNotFoundError\x00\x00No such domain: 'nosuch'\x00")); err != nil {
		t.Fatal(err)
	}
	if err := rec.Add([]byte("no nul"), []byte("0\x00")); err == nil {
		t.Fatal("a request without framing recorded")
	}
	if err := rec.Add([]byte(get), []byte("x")); !errors.Is(err, ErrNotAReply) {
		t.Fatalf("a reply that is no frame: %v", err)
	}
	sock := filepath.Join(t.TempDir(), "floor.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := ServeRecording(ctx, l, rec, nil)
	defer func() {
		cancel()
		s.Wait()
	}()
	for req, want := range map[string]string{
		get:     "0\x00default=False type=label red",
		missing: "2\x00QubesVMNotFoundError\x00\x00No such domain: 'nosuch'\x00",
		"admin.vm.property.Get+netvm dom0 name work\x00": "", // not recorded: aborted
	} {
		if got, _ := ask(t, sock, req); got != want {
			t.Errorf("%q: got %q, want %q", req, got, want)
		}
	}
}
