package main

import (
	"bufio"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// These run the built binary as a user would, against the bounds a user expects: a
// broken start-up fails within seconds naming what is wrong, and SIGINT or SIGTERM
// end a command at any time. The bounds are generous (a loaded 2-core machine); the
// tests wait on output lines and exits, never on sleeps.
const (
	promptly = 60 * time.Second
	lineWait = 90 * time.Second // start-up of a whole system, under -race elsewhere
)

// buildQubesbus builds the command into a temp dir.
func buildQubesbus(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "qubesbus")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	return bin
}

// proc is a running qubesbus, its stderr read line by line.
type proc struct {
	t     *testing.T
	cmd   *exec.Cmd
	lines chan string // stderr
	mu    sync.Mutex
	log   strings.Builder // all of stderr so far
	done  chan struct{}   // closed once it has exited
	err   error           // cmd.Wait's
}

func start(t *testing.T, bin string, args ...string) *proc {
	t.Helper()
	return startWith(t, bin, nil, args...)
}

// startWith is start with the command changed by prepare first (its environment, its
// stdout).
func startWith(t *testing.T, bin string, prepare func(*exec.Cmd), args ...string) *proc {
	t.Helper()
	p := &proc{t: t, cmd: exec.Command(bin, args...), lines: make(chan string, 1000), done: make(chan struct{})}
	p.cmd.Env = append(os.Environ(), "QUBESBUS_LOG_LEVEL=info")
	if prepare != nil {
		prepare(p.cmd)
	}
	stderr, err := p.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	read := make(chan struct{})
	go func() {
		defer close(read)
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			p.mu.Lock()
			p.log.WriteString(sc.Text() + "\n")
			p.mu.Unlock()
			select {
			case p.lines <- sc.Text():
			default: // nobody waits for lines any more
			}
		}
	}()
	go func() {
		<-read // Wait closes the pipe: read it all first
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.cmd.Process.Kill()
		<-p.done
	})
	return p
}

func (p *proc) stderr() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.log.String()
}

// waitLine waits for a stderr line holding every one of parts.
func (p *proc) waitLine(parts ...string) {
	p.t.Helper()
	p.line(parts...)
}

// line is waitLine returning the line.
func (p *proc) line(parts ...string) string {
	p.t.Helper()
	deadline := time.After(lineWait)
	for {
		select {
		case l := <-p.lines:
			ok := true
			for _, s := range parts {
				ok = ok && strings.Contains(l, s)
			}
			if ok {
				return l
			}
		case <-p.done:
			p.t.Fatalf("exited (%v) before a line with %q; stderr:\n%s", p.err, parts, p.stderr())
		case <-deadline:
			p.t.Fatalf("no line with %q after %s; stderr:\n%s", parts, lineWait, p.stderr())
		}
	}
}

// exit waits for the process to end within bound and returns its exit status (-1:
// killed by a signal).
func (p *proc) exit(bound time.Duration) int {
	p.t.Helper()
	select {
	case <-p.done:
	case <-time.After(bound):
		p.t.Fatalf("still running after %s; stderr:\n%s", bound, p.stderr())
	}
	var ee *exec.ExitError
	if p.err != nil && !errors.As(p.err, &ee) {
		p.t.Fatal(p.err)
	}
	return p.cmd.ProcessState.ExitCode()
}

func (p *proc) signal(sig os.Signal) {
	p.t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		p.t.Fatal(err)
	}
}

// runArgs are the flags of a `qubesbus run` in dir.
func runArgs(t *testing.T, dir string, more ...string) []string {
	seed, err := filepath.Abs("../../testdata/qubes.xml")
	if err != nil {
		t.Fatal(err)
	}
	return append([]string{"run", "--socket", filepath.Join(dir, "qubesd.sock"), "--data-dir", filepath.Join(dir, "data"),
		"--qubes-xml", seed}, more...)
}

// A taken NATS port, an unreachable NATS URL and a missing credentials file each end
// `run` within seconds, with an error naming the port, URL or file.
func TestRunFailsFastNamingWhat(t *testing.T) {
	bin := buildQubesbus(t)
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	port := strconv.Itoa(taken.Addr().(*net.TCPAddr).Port)
	unreadable := t.TempDir() // a directory: no one reads it as a file, root included
	for _, tc := range []struct {
		name string
		args []string
		want []string
	}{
		{"port in use", []string{"--nats-port", port}, []string{"127.0.0.1:" + port, "address already in use"}},
		{"refused url", []string{"--nats-url", "nats://127.0.0.1:1"}, []string{"nats://127.0.0.1:1"}},
		{"unresolvable url", []string{"--nats-url", "nats://nosuch.invalid:4222"}, []string{"nats://nosuch.invalid:4222"}},
		{"no creds file", []string{"--nats-url", "nats://127.0.0.1:1", "--nats-creds", "/nonexistent"}, []string{"/nonexistent"}},
		{"unreadable creds file", []string{"--nats-url", "nats://127.0.0.1:1", "--nats-creds", unreadable}, []string{unreadable}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			p := start(t, bin, runArgs(t, dir, tc.args...)...)
			if code := p.exit(promptly); code == 0 || code == -1 {
				t.Errorf("exit status %d, want a failure", code)
			}
			out := p.stderr()
			for _, w := range tc.want {
				if !strings.Contains(out, w) {
					t.Errorf("stderr does not name %q:\n%s", w, out)
				}
			}
		})
	}
}

// SIGTERM during start-up ends `run` promptly: sent as soon as the process exists
// (possibly before it handles signals at all), and once start-up is under way (the
// key dir exists, the embedded NATS and the services are coming up).
func TestRunSIGTERMDuringStartUp(t *testing.T) {
	bin := buildQubesbus(t)
	t.Run("at once", func(t *testing.T) {
		dir := t.TempDir()
		p := start(t, bin, runArgs(t, dir, "--nats-port", "-1")...)
		p.signal(syscall.SIGTERM)
		if code := p.exit(promptly); code != 0 && code != -1 {
			t.Errorf("exit status %d; stderr:\n%s", code, p.stderr())
		}
	})
	t.Run("under way", func(t *testing.T) {
		dir := t.TempDir()
		p := start(t, bin, runArgs(t, dir, "--nats-port", "-1")...)
		deadline := time.Now().Add(lineWait)
		for {
			if _, err := os.Stat(filepath.Join(dir, "data", "nkeys")); err == nil {
				break
			}
			select {
			case <-p.done:
				t.Fatalf("exited (%v) before start-up; stderr:\n%s", p.err, p.stderr())
			case <-time.After(time.Millisecond):
			}
			if time.Now().After(deadline) {
				t.Fatal("start-up never began")
			}
		}
		p.signal(syscall.SIGTERM)
		if code := p.exit(promptly); code != 0 {
			t.Errorf("exit status %d; stderr:\n%s", code, p.stderr())
		}
		if _, err := os.Lstat(filepath.Join(dir, "qubesd.sock")); !os.IsNotExist(err) {
			t.Errorf("socket left behind: %v", err)
		}
	})
}

// A running `run` stops on SIGINT with exit status 0 (Ctrl-C on `make run`), and a
// `query` of a stream (admin.Events) prints events as they come and ends on SIGINT
// with exit status 0.
func TestSIGINTEndsRunAndStreamingQuery(t *testing.T) {
	bin := buildQubesbus(t)
	dir := t.TempDir()
	sock := filepath.Join(dir, "qubesd.sock")
	p := start(t, bin, runArgs(t, dir, "--nats-port", "-1")...)
	p.waitLine(`msg="socket ready"`, sock)

	q := exec.Command(bin, "query", "--socket", sock, "-e", "admin.Events", "dom0")
	out, err := q.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var qerr strings.Builder
	q.Stderr = &qerr
	if err := q.Start(); err != nil {
		t.Fatal(err)
	}
	lines := make(chan string, 1000)
	qdone := make(chan error, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
		qdone <- q.Wait()
	}()
	defer q.Process.Kill()
	waitOut := func(want string) {
		t.Helper()
		deadline := time.After(lineWait)
		for {
			select {
			case l, ok := <-lines:
				if !ok {
					t.Fatalf("query ended before printing %q; stderr: %s", want, qerr.String())
				}
				if l == want {
					return
				}
			case <-deadline:
				t.Fatalf("query printed no %q", want)
			}
		}
	}
	// Events are printed as they arrive: the marker, then a change made now.
	waitOut("connection-established")
	set := exec.Command(bin, "query", "--socket", sock, "admin.vm.feature.Set", "work", "signals-test")
	set.Stdin = strings.NewReader("1")
	if b, err := set.CombinedOutput(); err != nil {
		t.Fatalf("feature.Set: %v: %s", err, b)
	}
	waitOut("domain-feature-set:signals-test")

	if err := q.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-qdone:
		if err != nil {
			t.Errorf("query after SIGINT: %v; stderr: %s", err, qerr.String())
		}
	case <-time.After(promptly):
		t.Fatal("query of admin.Events still running after SIGINT")
	}

	p.signal(syscall.SIGINT)
	if code := p.exit(promptly); code != 0 {
		t.Errorf("run: exit status %d after SIGINT; stderr:\n%s", code, p.stderr())
	}
	if _, err := os.Lstat(sock); !os.IsNotExist(err) {
		t.Errorf("socket left behind after a clean exit: %v", err)
	}
}

// stdoutLines starts p's stdout reader: its lines, closed at EOF. Call before start.
func stdoutLines(t *testing.T, cmd *exec.Cmd) <-chan string {
	t.Helper()
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	lines := make(chan string, 1000)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			select {
			case lines <- sc.Text():
			default:
			}
		}
	}()
	return lines
}

// startWithStdout is start with the process's stdout lines.
func startWithStdout(t *testing.T, bin string, args ...string) (*proc, <-chan string) {
	t.Helper()
	var lines <-chan string
	p := startWith(t, bin, func(c *exec.Cmd) { lines = stdoutLines(t, c) }, args...)
	return p, lines
}

// firstLine waits for p's first stdout line.
func firstLine(t *testing.T, p *proc, lines <-chan string) string {
	t.Helper()
	select {
	case l, ok := <-lines:
		if !ok {
			t.Fatalf("stdout closed before a line; stderr:\n%s", p.stderr())
		}
		return l
	case <-time.After(lineWait):
		t.Fatalf("no stdout line after %s; stderr:\n%s", lineWait, p.stderr())
	}
	panic("unreachable")
}

// TestSignalsEndEveryCommand: SIGINT or SIGTERM ends `events`, `audit`, `lab` and
// `bench` promptly at any time: while they connect (a NATS address that accepts the
// connection and never answers, which would hold them 5 s and then fail), while they
// start, and while they run. events, audit and lab exit 0 (a stop the user asked
// for); bench exits 1 and says it was interrupted (it has no report to give).
func TestSignalsEndEveryCommand(t *testing.T) {
	bin := buildQubesbus(t)
	t.Run("connecting", func(t *testing.T) {
		mute, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer mute.Close()
		url := "nats://" + mute.Addr().String()
		for _, cmd := range []string{"events", "audit"} {
			p := start(t, bin, cmd, "--nats-url", url, "--data-dir", t.TempDir())
			c, err := mute.Accept() // it is connecting
			if err != nil {
				t.Fatal(err)
			}
			p.signal(syscall.SIGTERM)
			if code := p.exit(promptly); code != 0 {
				t.Errorf("%s: exit status %d after SIGTERM while connecting; stderr:\n%s", cmd, code, p.stderr())
			}
			c.Close()
		}
	})

	t.Run("tailing", func(t *testing.T) {
		dir := t.TempDir()
		sock := filepath.Join(dir, "qubesd.sock")
		run := start(t, bin, runArgs(t, dir, "--nats-port", "-1")...)
		ready := run.line(`msg="socket ready"`, sock)
		i := strings.Index(ready, "nats=nats://")
		if i < 0 {
			t.Fatalf("no NATS URL in %q", ready)
		}
		url := strings.Fields(ready[i+len("nats="):])[0]
		set := exec.Command(bin, "query", "--socket", sock, "admin.vm.feature.Set", "work", "signals-test")
		set.Stdin = strings.NewReader("1")
		if b, err := set.CombinedOutput(); err != nil {
			t.Fatalf("feature.Set: %v: %s", err, b)
		}
		// An event and an audit record are in: each tail prints one, then follows.
		for _, c := range []struct {
			cmd  string
			want string
		}{{"events", "domain-feature-set:signals-test"}, {"audit", "admin.vm.feature.Set"}} {
			p, lines := startWithStdout(t, bin, c.cmd, "--nats-url", url, "--data-dir", filepath.Join(dir, "data"), "--since", "1")
			for l := firstLine(t, p, lines); !strings.Contains(l, c.want); l = firstLine(t, p, lines) {
			}
			p.signal(syscall.SIGINT)
			if code := p.exit(promptly); code != 0 {
				t.Errorf("%s: exit status %d after SIGINT; stderr:\n%s", c.cmd, code, p.stderr())
			}
		}
		run.signal(syscall.SIGTERM)
		if code := run.exit(promptly); code != 0 {
			t.Errorf("run: exit status %d", code)
		}
	})

	seed, _ := filepath.Abs("../../testdata/qubes.xml")
	labArgs := func(dir string) []string {
		return []string{"lab", "--hosts", "3", "--qubes", "20", "--qubes-xml", seed, "--dir", dir, "--nats-port", "-1"}
	}
	t.Run("lab at once", func(t *testing.T) {
		p := start(t, bin, labArgs(t.TempDir())...)
		p.signal(syscall.SIGTERM)
		if code := p.exit(promptly); code != 0 && code != -1 {
			t.Errorf("exit status %d; stderr:\n%s", code, p.stderr())
		}
	})
	t.Run("lab starting", func(t *testing.T) {
		p := start(t, bin, labArgs(t.TempDir())...)
		p.waitLine("started the config change log") // the first host's store is up
		p.signal(syscall.SIGINT)
		if code := p.exit(promptly); code != 0 {
			t.Errorf("exit status %d; stderr:\n%s", code, p.stderr())
		}
	})
	t.Run("lab ready", func(t *testing.T) {
		p := start(t, bin, labArgs(t.TempDir())...)
		p.waitLine(`msg="lab ready"`)
		p.signal(syscall.SIGTERM)
		if code := p.exit(promptly); code != 0 {
			t.Errorf("exit status %d; stderr:\n%s", code, p.stderr())
		}
	})

	benchArgs := []string{"bench", "--qubes-xml", seed, "--duration", "10m", "--qubes", "0", "--clients", "1",
		"--classes", "property.Get", "--subscribers", "1", "--skip-qvm-ls"}
	t.Run("bench at once", func(t *testing.T) {
		p := startWith(t, bin, func(c *exec.Cmd) { c.Env = append(c.Env, "TMPDIR="+t.TempDir()) }, benchArgs...)
		p.signal(syscall.SIGINT)
		if code := p.exit(promptly); code != 1 && code != -1 {
			t.Errorf("exit status %d; stderr:\n%s", code, p.stderr())
		}
	})
	t.Run("bench measuring", func(t *testing.T) {
		tmp := t.TempDir()
		p := startWith(t, bin, func(c *exec.Cmd) { c.Env = append(c.Env, "TMPDIR="+tmp) }, benchArgs...)
		// Its host serves (the socket is there): the measurement of 10 minutes runs.
		deadline := time.Now().Add(lineWait)
		for {
			socks, _ := filepath.Glob(filepath.Join(tmp, "qubesbus-bench*", "scale-0", "qubesd.sock"))
			if len(socks) > 0 {
				break
			}
			select {
			case <-p.done:
				t.Fatalf("exited (%v) before measuring; stderr:\n%s", p.err, p.stderr())
			case <-time.After(10 * time.Millisecond):
			}
			if time.Now().After(deadline) {
				t.Fatalf("no host after %s; stderr:\n%s", lineWait, p.stderr())
			}
		}
		p.signal(syscall.SIGTERM)
		if code := p.exit(promptly); code != 1 || !strings.Contains(p.stderr(), "interrupted") {
			t.Errorf("exit status %d; stderr:\n%s", code, p.stderr())
		}
		if left, _ := filepath.Glob(filepath.Join(tmp, "qubesbus-bench*")); len(left) > 0 {
			t.Errorf("bench left %v behind", left)
		}
	})
}

// The tails (events, audit) fail within seconds naming what is wrong: the URL, an
// unreadable credentials or key file, or where the role's key was looked for when
// there is none.
func TestTailsFailFastNamingWhat(t *testing.T) {
	bin := buildQubesbus(t)
	garbage := filepath.Join(t.TempDir(), "garbage.nk")
	if err := os.WriteFile(garbage, []byte("not a seed\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	run := start(t, bin, runArgs(t, dir, "--nats-port", "-1")...)
	ready := run.line(`msg="socket ready"`)
	url := strings.Fields(ready[strings.Index(ready, "nats=")+len("nats="):])[0]
	unreadable := t.TempDir()
	nokeys := t.TempDir()
	for _, cmd := range []string{"events", "audit"} {
		for _, tc := range []struct {
			name string
			args []string
			want string
		}{
			{"refused url", []string{"--nats-url", "nats://127.0.0.1:1"}, "nats://127.0.0.1:1"},
			{"unreadable creds", []string{"--nats-url", url, "--nats-creds", unreadable}, unreadable},
			{"garbage key", []string{"--nats-url", url, "--nats-nkey", garbage}, garbage},
			{"no key", []string{"--nats-url", url, "--data-dir", nokeys}, filepath.Join(nokeys, "nkeys")},
		} {
			t.Run(cmd+"/"+tc.name, func(t *testing.T) {
				p := start(t, bin, append([]string{cmd}, tc.args...)...)
				if code := p.exit(promptly); code != 1 {
					t.Errorf("exit status %d, want 1", code)
				}
				if !strings.Contains(p.stderr(), tc.want) {
					t.Errorf("stderr does not name %q:\n%s", tc.want, p.stderr())
				}
			})
		}
	}
}

// A running `run` whose socket is deleted creates it again, and calls go through it.
func TestRunRecreatesItsSocket(t *testing.T) {
	bin := buildQubesbus(t)
	dir := t.TempDir()
	sock := filepath.Join(dir, "qubesd.sock")
	p := start(t, bin, runArgs(t, dir)...)
	p.waitLine(`msg="socket ready"`, sock)
	if err := os.Remove(sock); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(promptly)
	for {
		if label, err := runQuery(bin, sock, "admin.vm.property.Get", "work", "label"); err == nil && label == "default=False type=label blue\n" {
			break
		}
		select {
		case <-p.done:
			t.Fatalf("exited (%v); stderr:\n%s", p.err, p.stderr())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("no socket answering %s after its deletion; stderr:\n%s", promptly, p.stderr())
		}
	}
	p.signal(syscall.SIGTERM)
	if code := p.exit(promptly); code != 0 {
		t.Errorf("exit status %d", code)
	}
}
