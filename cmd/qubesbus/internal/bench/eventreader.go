package bench

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// A real dom0 event listener is a process of its own, with its own scheduler and
// threads, not goroutines inside the daemon. So by default the bench re-executes its
// own binary as the listener: with these variables set, the binary does nothing but
// open the admin.Events connections, read them, and report each bench event's latency.
// The hook is an init function because this package is all the bench owns of the
// binary (and it works as well in the test binary, which re-executes itself).
const (
	readerSocketEnv = "QUBESBUS_BENCH_EVENT_READER"        // gateway socket path
	readerConnsEnv  = "QUBESBUS_BENCH_EVENT_READER_CONNS"  // admin.Events connections
	readerEventsEnv = "QUBESBUS_BENCH_EVENT_READER_EVENTS" // bench events each one waits for
	// InProcessReadersEnv, if set, makes the suite read admin.Events in its own process
	// (the older, less realistic measurement), as Config.InProcessReaders does.
	InProcessReadersEnv = "QUBESBUS_BENCH_INPROCESS_READERS"
)

// benchEvent is the event type the bench publishes; its last kwarg is the wall-clock
// send time in nanoseconds. Wall clock, because the monotonic clock of one process
// means nothing in another; both run on the same machine, so they share it.
const benchEvent = "domain-feature-set:bench"

func init() {
	socket := os.Getenv(readerSocketEnv)
	if socket == "" {
		return
	}
	os.Exit(readerMain(socket))
}

// readerMain is the child's whole life: subscribe, say "ready" once every
// connection-established has arrived, read until each connection has seen its bench
// events (or stdin closes: the parent gave up waiting), then print one latency in
// nanoseconds per line. Nothing is written while events flow.
func readerMain(socket string) int {
	conns, err1 := strconv.Atoi(os.Getenv(readerConnsEnv))
	events, err2 := strconv.Atoi(os.Getenv(readerEventsEnv))
	if err := errors.Join(err1, err2); err != nil {
		fmt.Fprintln(os.Stderr, "bench event reader:", err)
		return 2
	}
	// The child lives for one fan-out and allocates little: no collection should
	// pause it while it measures.
	debug.SetGCPercent(-1)
	r, err := openReader(socket, conns)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench event reader:", err)
		return 1
	}
	defer r.close()
	if _, err := io.WriteString(os.Stdout, "ready\n"); err != nil {
		return 1
	}
	go func() { _, _ = io.Copy(io.Discard, os.Stdin); r.stop.Store(true) }()
	lats, err := r.read(events)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench event reader:", err)
		return 1
	}
	w := bufio.NewWriter(os.Stdout)
	for _, ns := range lats {
		w.WriteString(strconv.FormatInt(ns, 10))
		w.WriteByte('\n')
	}
	if err := w.Flush(); err != nil {
		return 1
	}
	return 0
}

// eventReader reads many admin.Events connections from one thread, through epoll on
// non-blocking sockets, the way a single-threaded event loop listens. It is a
// measuring instrument: each read is timestamped as it returns, with no goroutine to
// wake and no allocation per frame (a garbage collection would show up as latency),
// so what it measures is the gateway's delivery, not the reader's own scheduling.
type eventReader struct {
	ep    int
	conns []*readerConn
	stop  atomic.Bool // set to give up waiting
}

type readerConn struct {
	fd   int
	buf  []byte // received, not yet parsed: buf[:n]
	n    int
	lats []int64
}

// openReader subscribes conns times to every event (as dom0) and returns once each
// connection-established has arrived.
func openReader(socket string, conns int) (*eventReader, error) {
	ep, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll: %w", err)
	}
	r := &eventReader{ep: ep}
	for i := range conns {
		c, err := dialEvents(socket)
		if err != nil {
			r.close()
			return nil, err
		}
		r.conns = append(r.conns, c)
		ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(i)} // Fd carries the index
		if err := unix.EpollCtl(ep, unix.EPOLL_CTL_ADD, c.fd, &ev); err != nil {
			r.close()
			return nil, fmt.Errorf("epoll: %w", err)
		}
	}
	return r, nil
}

// dialEvents connects as qubesadmin does (request, half-close) and reads the
// connection-established frame, then makes the socket non-blocking.
func dialEvents(socket string) (*readerConn, error) {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("socket: %w", err)
	}
	c := &readerConn{fd: fd, buf: make([]byte, 64<<10)}
	fail := func(err error) (*readerConn, error) {
		unix.Close(fd)
		return nil, fmt.Errorf("admin.Events: %w", err)
	}
	if err := unix.Connect(fd, &unix.SockaddrUnix{Name: socket}); err != nil {
		return fail(err)
	}
	req := []byte("admin.Events+ dom0 name dom0\x00")
	for len(req) > 0 {
		n, err := unix.Write(fd, req)
		if err != nil && err != unix.EINTR {
			return fail(err)
		}
		req = req[max(n, 0):]
	}
	if err := unix.Shutdown(fd, unix.SHUT_WR); err != nil {
		return fail(err)
	}
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: 30})
	for {
		size, _, err := scanFrame(c.buf[:c.n])
		if err != nil {
			return fail(err)
		}
		if size > 0 { // connection-established; keep whatever followed it
			c.n = copy(c.buf, c.buf[size:c.n])
			break
		}
		n, err := unix.Read(fd, c.buf[c.n:])
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fail(err)
		}
		if n == 0 {
			return fail(io.ErrUnexpectedEOF)
		}
		c.n += n
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		return fail(err)
	}
	return c, nil
}

// read waits until every connection has seen events bench events, or stop is set,
// and returns their latencies in nanoseconds.
func (r *eventReader) read(events int) ([]int64, error) {
	// One thread for the whole loop, as an event loop has.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	for _, c := range r.conns {
		c.lats = make([]int64, 0, events)
		if err := c.parse(time.Now().UnixNano()); err != nil { // what came with connection-established
			return nil, err
		}
	}
	waiting := 0
	for _, c := range r.conns {
		if len(c.lats) < events {
			waiting++
		}
	}
	ready := make([]unix.EpollEvent, max(len(r.conns), 1))
	for waiting > 0 && !r.stop.Load() {
		n, err := unix.EpollWait(r.ep, ready, 50) // wakes now and then to see stop
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("epoll: %w", err)
		}
		for _, ev := range ready[:n] {
			c := r.conns[ev.Fd]
			m, err := unix.Read(c.fd, c.buf[c.n:])
			now := time.Now().UnixNano()
			if err == unix.EAGAIN || err == unix.EINTR {
				continue
			}
			if err != nil {
				return nil, fmt.Errorf("read: %w", err)
			}
			if m == 0 {
				return nil, io.ErrUnexpectedEOF
			}
			c.n += m
			before := len(c.lats)
			if err := c.parse(now); err != nil {
				return nil, err
			}
			if before < events && len(c.lats) >= events {
				waiting--
			}
		}
	}
	var out []int64
	for _, c := range r.conns {
		out = append(out, c.lats...)
	}
	return out, nil
}

// parse consumes the whole frames received, recording the bench events' latencies
// against now, the time they were read.
func (c *readerConn) parse(now int64) error {
	off := 0
	for {
		size, ns, err := scanFrame(c.buf[off:c.n])
		if err != nil {
			return err
		}
		if size == 0 {
			break
		}
		if ns > 0 {
			c.lats = append(c.lats, now-ns)
		}
		off += size
	}
	if off == 0 && c.n == len(c.buf) {
		return errors.New("event frame larger than the read buffer")
	}
	c.n = copy(c.buf, c.buf[off:c.n])
	return nil
}

func (r *eventReader) close() {
	for _, c := range r.conns {
		unix.Close(c.fd)
	}
	unix.Close(r.ep)
}

// scanFrame finds the event frame that b starts with: its size (0 if b holds only part
// of it) and, for a bench event, its send time (0 for other events). The frame is
// "1\0", subject, event, then key, value, … up to an empty key, each NUL-terminated.
func scanFrame(b []byte) (size int, ns int64, err error) {
	if len(b) < 2 {
		return 0, 0, nil
	}
	if b[0] != '1' || b[1] != 0 {
		return 0, 0, fmt.Errorf("not an event frame: %.60q", b)
	}
	bench := false
	pos := 2
	for i := 1; ; i++ { // i numbers the fields after the header
		j := bytes.IndexByte(b[pos:], 0)
		if j < 0 {
			return 0, 0, nil
		}
		f := b[pos : pos+j]
		pos += j + 1
		switch {
		case i >= 3 && i%2 == 1 && len(f) == 0:
			if !bench {
				ns = 0
			}
			return pos, ns, nil
		case i == 2:
			bench = string(f) == benchEvent
		case i == 6 && bench:
			var ok bool
			if ns, ok = parseNanos(f); !ok {
				bench = false
			}
		}
	}
}

// parseNanos parses a positive int64 in decimal without allocating.
func parseNanos(b []byte) (int64, bool) {
	if len(b) == 0 {
		return 0, false
	}
	var n int64
	for _, c := range b {
		if c < '0' || c > '9' || n > (math.MaxInt64-int64(c-'0'))/10 {
			return 0, false
		}
		n = n*10 + int64(c-'0')
	}
	return n, n > 0
}

// startReading subscribes conns times, from a child process or from this one, and
// returns a function that waits (at most 30 s) for events bench events on each
// connection and returns their latencies.
func startReading(ctx context.Context, socket string, conns, events int, inProcess bool) (func() ([]time.Duration, error), error) {
	if inProcess {
		return readInProcess(socket, conns, events)
	}
	p, err := startReaders(ctx, socket, conns, events)
	if err != nil {
		return nil, err
	}
	return func() ([]time.Duration, error) { return p.latencies(30 * time.Second) }, nil
}

// readerProc is a running child reader.
type readerProc struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	stdout *bufio.Reader
	cancel context.CancelFunc
}

// startReaders starts the child and returns once all its subscriptions are established.
func startReaders(ctx context.Context, socket string, conns, events int) (*readerProc, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("event reader: %w", err)
	}
	ctx, cancel := context.WithCancel(ctx)
	cmd := exec.CommandContext(ctx, exe)
	cmd.Env = append(os.Environ(), readerSocketEnv+"="+socket,
		readerConnsEnv+"="+strconv.Itoa(conns), readerEventsEnv+"="+strconv.Itoa(events))
	cmd.Stderr = os.Stderr
	cmd.WaitDelay = 5 * time.Second
	stdin, err := cmd.StdinPipe()
	if err != nil {
		cancel()
		return nil, fmt.Errorf("event reader: %w", err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		cancel()
		return nil, fmt.Errorf("event reader: %w", err)
	}
	if err := cmd.Start(); err != nil {
		cancel()
		return nil, fmt.Errorf("event reader: %w", err)
	}
	p := &readerProc{cmd: cmd, stdin: stdin, stdout: bufio.NewReader(out), cancel: cancel}
	ready := make(chan error, 1)
	go func() {
		line, err := p.stdout.ReadString('\n')
		if err == nil && line != "ready\n" {
			err = fmt.Errorf("unexpected %q", line)
		}
		ready <- err
	}()
	wait := time.NewTimer(30 * time.Second)
	select {
	case err = <-ready:
	case <-wait.C:
		err = errors.New("subscriptions not established within 30s")
	case <-ctx.Done():
		err = ctx.Err()
	}
	wait.Stop()
	if err != nil {
		cancel()
		_ = cmd.Wait()
		return nil, fmt.Errorf("event reader: %w", err)
	}
	return p, nil
}

// latencies waits up to wait for the child to read everything (then tells it to stop
// and report what it has) and returns the latencies it measured.
func (p *readerProc) latencies(wait time.Duration) ([]time.Duration, error) {
	defer p.cancel()
	t := time.AfterFunc(wait, func() { p.stdin.Close() })
	defer t.Stop()
	var lats []time.Duration
	for {
		line, err := p.stdout.ReadString('\n')
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("event reader: %w", err)
		}
		ns, err := strconv.ParseInt(strings.TrimSpace(line), 10, 64)
		if err != nil {
			return nil, fmt.Errorf("event reader: %w", err)
		}
		lats = append(lats, time.Duration(ns))
	}
	p.stdin.Close()
	if err := p.cmd.Wait(); err != nil {
		return nil, fmt.Errorf("event reader: %w", err)
	}
	return lats, nil
}

// readInProcess reads the subscribers from a thread of this process.
func readInProcess(socket string, conns, events int) (collect func() ([]time.Duration, error), err error) {
	r, err := openReader(socket, conns)
	if err != nil {
		return nil, err
	}
	type result struct {
		lats []int64
		err  error
	}
	done := make(chan result, 1)
	go func() {
		lats, err := r.read(events)
		done <- result{lats, err}
	}()
	return func() ([]time.Duration, error) {
		defer r.close()
		t := time.AfterFunc(30*time.Second, func() { r.stop.Store(true) })
		defer t.Stop()
		res := <-done
		out := make([]time.Duration, len(res.lats))
		for i, ns := range res.lats {
			out[i] = time.Duration(ns)
		}
		return out, res.err
	}, nil
}
