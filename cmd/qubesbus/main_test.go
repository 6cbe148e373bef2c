package main

import (
	"bufio"
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestRunQuerySIGTERM runs the real binary: `run` logs one ready line, `query` prints
// what qubesd-query would, and SIGTERM stops it cleanly with qubes.xml saved.
func TestRunQuerySIGTERM(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "qubesbus")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	seed := filepath.Join(dir, "seed.xml")
	orig, err := os.ReadFile("../../testdata/qubes.xml")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(seed, orig, 0o644); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "run", "qubesd.sock")
	cmd := exec.Command(bin, "run", "--data-dir", filepath.Join(dir, "data"), "--qubes-xml", seed, "--nats-port", "-1")
	cmd.Env = append(os.Environ(), "QUBESBUS_SOCKET="+sock)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	lines := make(chan string, 100)
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	deadline := time.After(20 * time.Second)
	for ready := false; !ready; {
		select {
		case l := <-lines:
			ready = strings.Contains(l, `msg="socket ready"`) && strings.Contains(l, sock)
		case <-deadline:
			t.Fatal("no 'socket ready' line")
		}
	}

	q := exec.Command(bin, "query", "--socket", sock, "-e", "admin.vm.List", "dom0")
	out, err := q.Output()
	if err != nil {
		t.Fatalf("query: %v", err)
	}
	if n := bytes.Count(out, []byte("\n")); n != 9 || !bytes.HasPrefix(out, []byte("dom0 class=AdminVM state=Running")) {
		t.Fatalf("query printed %d lines:\n%s", n, out)
	}
	q = exec.Command(bin, "query", "--socket", sock, "-e", "admin.vm.List", "nosuch")
	var qerr bytes.Buffer
	q.Stderr = &qerr
	if err := q.Run(); err == nil || q.ProcessState.ExitCode() != 1 || qerr.String() != "QubesVMNotFoundError: No such domain: 'nosuch'\n" {
		t.Fatalf("query of a missing qube: exit %v, stderr %q", err, qerr.String())
	}

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("exit after SIGTERM: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("no exit after SIGTERM")
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Errorf("socket left behind after a clean exit: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "data", "qubes.xml")); err != nil {
		t.Errorf("qubes.xml not in the data dir: %v", err)
	}
	if now, _ := os.ReadFile(seed); !bytes.Equal(now, orig) {
		t.Error("the seed qubes.xml was modified")
	}
}

// call sends one request (header, NUL, payload), half-closes, and reads to EOF, or
// until ctx ends (then with ctx's error).
func call(ctx context.Context, socket, header string, payload []byte) ([]byte, error) {
	var resp []byte
	err := callTo(ctx, socket, header, payload, func(b []byte) error {
		resp = append(resp, b...)
		return nil
	})
	return resp, err
}
