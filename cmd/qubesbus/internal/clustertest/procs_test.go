package clustertest

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/access"
)

// proc is a child process that can be killed with SIGKILL and started again.
type proc struct {
	name string
	args []string
	env  []string
	log  *bytes.Buffer
	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{} // closed once the running process has exited
}

func (p *proc) start(t *testing.T) {
	t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	cmd := exec.Command(p.args[0], p.args[1:]...)
	cmd.Env = append(os.Environ(), p.env...)
	if p.log == nil {
		p.log = &bytes.Buffer{}
	}
	cmd.Stdout, cmd.Stderr = &syncWriter{w: p.log}, &syncWriter{w: p.log}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", p.name, err)
	}
	p.cmd = cmd
	done := make(chan struct{})
	p.done = done
	go func() { _ = cmd.Wait(); close(done) }()
}

// exited reports whether the process last started has exited.
func (p *proc) exited() bool {
	p.mu.Lock()
	done := p.done
	p.mu.Unlock()
	if done == nil {
		return false
	}
	select {
	case <-done:
		return true
	default:
		return false
	}
}

func (p *proc) kill() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd != nil && p.cmd.Process != nil {
		_ = p.cmd.Process.Signal(syscall.SIGKILL)
		<-p.done
	}
}

// quit asks a Go process for its goroutines (SIGQUIT prints them and exits) and
// waits until it has exited.
func (p *proc) quit() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil || p.cmd.Process == nil {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGQUIT)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

func (p *proc) stop() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil || p.cmd.Process == nil {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second): // a process that ignores SIGTERM is a finding, not a hang
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

type syncWriter struct {
	mu sync.Mutex
	w  *bytes.Buffer
}

func (s *syncWriter) Write(b []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(b)
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// build compiles the nats-server (from the module this repository pins) and qubesbus.
func build(t *testing.T, dir string) (natsBin, qubesbusBin string) {
	t.Helper()
	natsBin, qubesbusBin = filepath.Join(dir, "nats-server"), filepath.Join(dir, "qubesbus")
	for _, b := range []struct{ dir, out, pkg string }{
		{"../../../../bus", natsBin, "github.com/nats-io/nats-server/v2"},
		{"../..", qubesbusBin, "."},
	} {
		cmd := exec.Command("go", "build", "-o", b.out, b.pkg)
		cmd.Dir = b.dir
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("build %s: %v\n%s", b.pkg, err, out)
		}
	}
	return natsBin, qubesbusBin
}

// natsNodes writes the configs of a 3-node JetStream cluster on loopback and returns
// its processes and client URLs.
// startNATS starts the three nodes. Their ports are picked free before the servers
// bind them, so another process may take one in between: then all three start again,
// on fresh ports, in a fresh directory.
func startNATS(t *testing.T, dir, bin string) ([]*proc, []string) {
	t.Helper()
	for attempt := 1; ; attempt++ {
		try := filepath.Join(dir, fmt.Sprintf("nats-%d", attempt))
		if err := os.MkdirAll(try, 0o755); err != nil {
			t.Fatal(err)
		}
		nodes, urls := natsNodes(t, try, bin)
		for _, n := range nodes {
			n.start(t)
		}
		if listening(urls, 20*time.Second) {
			return nodes, urls
		}
		for _, n := range nodes {
			n.stop()
		}
		if attempt == 3 {
			t.Fatalf("the nats nodes did not come up on three sets of ports")
		}
		t.Logf("a nats node did not come up; starting the nodes again on fresh ports")
	}
}

// listening reports whether every URL's port accepts connections before timeout.
func listening(urls []string, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for _, u := range urls {
		addr := strings.TrimPrefix(u, "nats://")
		for {
			c, err := net.DialTimeout("tcp", addr, time.Second)
			if err == nil {
				c.Close()
				break
			}
			if time.Now().After(deadline) {
				return false
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	return true
}

// password is the test's password of a role's user.
func password(role string) string { return "pw-" + role }

// rolePasswords is the environment nats-server reads the users' passwords from
// (deploy/nats/permissions.conf).
func rolePasswords() []string {
	var env []string
	for _, r := range access.Roles {
		env = append(env, "QUBESBUS_"+strings.ToUpper(r.Name)+"_PASSWORD="+password(r.Name))
	}
	return env
}

// natsNodes configures three clustered nodes with deploy/nats's users, so that every
// qubesbus process runs with its role's permissions, as deployed.
func natsNodes(t *testing.T, dir, bin string) ([]*proc, []string) {
	t.Helper()
	perms, err := os.ReadFile("../../../../deploy/nats/permissions.conf")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "permissions.conf"), perms, 0o600); err != nil {
		t.Fatal(err)
	}
	client := []int{freePort(t), freePort(t), freePort(t)}
	route := []int{freePort(t), freePort(t), freePort(t)}
	var nodes []*proc
	var urls []string
	for i := range client {
		conf := filepath.Join(dir, fmt.Sprintf("n%d.conf", i+1))
		body := fmt.Sprintf(`server_name: n%d
listen: 127.0.0.1:%d
jetstream { store_dir: %q }
cluster {
  name: qubesbus-test
  listen: 127.0.0.1:%d
  routes: [nats-route://127.0.0.1:%d, nats-route://127.0.0.1:%d, nats-route://127.0.0.1:%d]
}
include ./permissions.conf
`, i+1, client[i], filepath.Join(dir, fmt.Sprintf("js%d", i+1)), route[i], route[0], route[1], route[2])
		if err := os.WriteFile(conf, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		nodes = append(nodes, &proc{name: fmt.Sprintf("n%d", i+1), args: []string{bin, "-c", conf}, env: rolePasswords()})
		urls = append(urls, fmt.Sprintf("nats://127.0.0.1:%d", client[i]))
	}
	return nodes, urls
}
