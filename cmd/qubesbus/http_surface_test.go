package main

import (
	"bufio"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/qubesbus/qubesbus/bus/bustest"
)

// listeningTCP returns the local addresses (hex, as /proc/net/tcp writes them) of the
// TCP sockets process pid listens on.
func listeningTCP(t *testing.T, pid int) []string {
	t.Helper()
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	inodes := map[string]bool{}
	for _, fd := range fds {
		link, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name()))
		if ino, ok := strings.CutPrefix(link, "socket:["); err == nil && ok {
			inodes[strings.TrimSuffix(ino, "]")] = true
		}
	}
	var out []string
	for _, table := range []string{"tcp", "tcp6"} {
		f, err := os.Open(fmt.Sprintf("/proc/%d/net/%s", pid, table))
		if err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(f)
		sc.Scan() // the heading
		for sc.Scan() {
			// sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
			fields := strings.Fields(sc.Text())
			if len(fields) > 9 && fields[3] == "0A" && inodes[fields[9]] { // 0A: LISTEN
				out = append(out, table+" "+fields[1])
			}
		}
		f.Close()
	}
	return out
}

// TestHTTPSurface: `run` opens no TCP port of its own accord: no NATS listener (the
// services connect in-process), no HTTP. Asked with --http 127.0.0.1:0, it listens
// there only, and that listener changes nothing: every path (the web view, its API
// and streams, the static files, health, readiness, metrics) refuses any method but
// GET and HEAD, so no request through it can change a qube.
func TestHTTPSurface(t *testing.T) {
	bin := buildQubesbus(t)
	t.Run("default", func(t *testing.T) {
		dir := t.TempDir()
		p := start(t, bin, runArgs(t, dir)...)
		p.waitLine(`msg="socket ready"`, "in-process only")
		if l := listeningTCP(t, p.cmd.Process.Pid); len(l) > 0 {
			t.Errorf("listening without being asked: %v", l)
		}
		p.signal(syscall.SIGTERM)
		if code := p.exit(promptly); code != 0 {
			t.Errorf("exit status %d", code)
		}
	})
	t.Run("--http", func(t *testing.T) {
		dir := t.TempDir()
		p := start(t, bin, runArgs(t, dir, "--http", "127.0.0.1:0")...)
		line := p.line(`msg="http ready"`)
		addr := strings.Fields(line[strings.Index(line, "addr=")+len("addr="):])[0]
		p.waitLine(`msg="socket ready"`)
		if l := listeningTCP(t, p.cmd.Process.Pid); len(l) != 1 || !strings.HasPrefix(l[0], "tcp 0100007F:") {
			t.Errorf("listening on %v, want the one loopback address asked for", l)
		}
		client := &http.Client{Timeout: 10 * time.Second}
		do := func(method, path string) int {
			req, err := http.NewRequest(method, "http://"+addr+path, strings.NewReader("name=work&label=red"))
			if err != nil {
				t.Fatal(err)
			}
			resp, err := client.Do(req)
			if err != nil {
				t.Fatalf("%s %s: %v", method, path, err)
			}
			_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<16))
			resp.Body.Close()
			return resp.StatusCode
		}
		bustest.CheckFor(t, lineWait, 50*time.Millisecond, func() error {
			if code := do("GET", "/api/hosts"); code != http.StatusOK {
				return fmt.Errorf("/api/hosts: %d", code)
			}
			return nil
		})
		for _, path := range []string{"/", "/api/hosts", "/state", "/events", "/static/app.js", "/healthz", "/readyz", "/metrics", "/admin.vm.property.Set"} {
			for _, method := range []string{"POST", "PUT", "PATCH", "DELETE"} {
				if code := do(method, path); code != http.StatusMethodNotAllowed && code != http.StatusNotFound {
					t.Errorf("%s %s: %d, want 405 (or 404)", method, path, code)
				}
			}
		}
		label, err := runQuery(bin, filepath.Join(dir, "qubesd.sock"), "admin.vm.property.Get", "work", "label")
		if err != nil || label != "default=False type=label blue\n" {
			t.Errorf("work's label after the requests: %q %v", label, err)
		}
		p.signal(syscall.SIGTERM)
		if code := p.exit(promptly); code != 0 {
			t.Errorf("exit status %d", code)
		}
	})
}

// runQuery runs `qubesbus query` of one call with no payload and returns its stdout.
func runQuery(bin, socket, method, dest, arg string) (string, error) {
	out, err := exec.Command(bin, "query", "--socket", socket, "-e", method, dest, arg).Output()
	return string(out), err
}
