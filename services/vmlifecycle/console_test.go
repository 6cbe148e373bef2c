package vmlifecycle_test

import (
	"bytes"
	"errors"
	"io"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/qubesbus/qubesbus/bus/envelope"
	"github.com/qubesbus/qubesbus/services/vmlifecycle/simdriver"
)

// readUntil reads the terminal until want has appeared, failing the test after a minute
// without it (the bound only turns a hang into a failure).
func readUntil(t *testing.T, tty *os.File, want string) string {
	t.Helper()
	var got bytes.Buffer
	buf := make([]byte, 256)
	deadline := time.Now().Add(time.Minute)
	for !strings.Contains(got.String(), want) {
		if time.Now().After(deadline) {
			t.Fatalf("terminal shows %q, never %q", got.String(), want)
		}
		_ = tty.SetReadDeadline(time.Now().Add(time.Second))
		n, err := tty.Read(buf)
		got.Write(buf[:n])
		if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("read terminal after %q: %v", got.String(), err)
		}
	}
	return got.String()
}

// TestConsole: a running qube's console is a real terminal with a boot log and a login
// prompt that echoes what is typed; a paused qube's too; a halted qube gets qubesd's
// error; the terminal ends when the qube stops.
func TestConsole(t *testing.T) {
	x := newHost(t, simdriver.Config{})
	notRunning := exc("QubesVMNotRunningError", "Domain not running (either powered off or paused): 'work'")
	if r := x.call("admin.vm.Console", "work", ""); r != notRunning {
		t.Fatalf("halted: %v", r)
	}
	if r := x.call("admin.vm.Console", "dom0", ""); r != ok("") {
		t.Fatalf("dom0: %v", r)
	}
	if r := x.call("admin.vm.Start", "work", ""); r.Status != envelope.StatusOK {
		t.Fatalf("start: %v", r)
	}
	r := x.call("admin.vm.Console", "work", "")
	if r.Status != envelope.StatusOK || !strings.HasPrefix(r.Content, "/dev/pts/") {
		t.Fatalf("console: %v", r)
	}
	tty, err := os.OpenFile(r.Content, os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer tty.Close()
	readUntil(t, tty, "work login: ")
	if _, err := io.WriteString(tty, "user\r"); err != nil {
		t.Fatal(err)
	}
	if got := readUntil(t, tty, "work login: "); !strings.HasPrefix(got, "user\r\n") {
		t.Fatalf("echo: %q", got)
	}
	// The same terminal for a second caller, and for a paused qube.
	if r2 := x.call("admin.vm.Console", "work", ""); r2 != r {
		t.Fatalf("second call: %v, want %v", r2, r)
	}
	if p := x.call("admin.vm.Pause", "work", ""); p.Status != envelope.StatusOK {
		t.Fatalf("pause: %v", p)
	}
	if r2 := x.call("admin.vm.Console", "work", ""); r2 != r {
		t.Fatalf("paused: %v, want %v", r2, r)
	}
	if k := x.call("admin.vm.Kill", "work", ""); k.Status != envelope.StatusOK {
		t.Fatalf("kill: %v", k)
	}
	// The guest's end is gone: reading the terminal ends (EIO once nothing holds it).
	_ = tty.SetReadDeadline(time.Now().Add(time.Minute))
	buf := make([]byte, 64)
	for {
		if _, err := tty.Read(buf); err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatal("the terminal outlived its qube")
			}
			break
		}
	}
	if r := x.call("admin.vm.Console", "work", ""); r != notRunning {
		t.Fatalf("after the stop: %v", r)
	}
}
