// Package clustertest runs qubesbus as separate processes on a 3-node nats-server
// cluster (real binaries, loopback ports) and injects faults under load. It is slow
// (binaries are built, a minute of load), so `make cluster-test` runs it, with
// QUBESBUS_CLUSTER_TEST=1; `make test` runs the in-process cluster tests instead.
package clustertest

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/access"
)

func call(socket, req string, timeout time.Duration) ([]byte, error) {
	c, err := net.DialTimeout("unix", socket, timeout)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(timeout))
	if _, err := c.Write([]byte(req)); err != nil {
		return nil, err
	}
	_ = c.(*net.UnixConn).CloseWrite()
	return io.ReadAll(c)
}

// instances counts the running instances of a micro service.
func instances(nc *nats.Conn, name string) int {
	subj, _ := micro.ControlSubject(micro.PingVerb, name, "")
	inbox := nc.NewInbox()
	sub, err := nc.SubscribeSync(inbox)
	if err != nil {
		return 0
	}
	defer sub.Unsubscribe()
	_ = nc.PublishRequest(subj, inbox, nil)
	n := 0
	for {
		if _, err := sub.NextMsg(300 * time.Millisecond); err != nil {
			return n
		}
		n++
	}
}

func waitFor(t *testing.T, what string, timeout time.Duration, f func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !f() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

type counters struct {
	reads, readFails, writes, writeAcked, writeFails atomic.Int64
}

func TestClusterFaults(t *testing.T) {
	if os.Getenv("QUBESBUS_CLUSTER_TEST") == "" {
		t.Skip("set QUBESBUS_CLUSTER_TEST=1 (make cluster-test) to run the multi-process fault test")
	}
	loadFor := 40 * time.Second
	if v, err := time.ParseDuration(os.Getenv("QUBESBUS_CLUSTER_LOAD")); err == nil {
		loadFor = v
	}
	dir := t.TempDir()
	natsBin, qb := build(t, dir)
	nodes, urls := startNATS(t, dir, natsBin)
	for _, n := range nodes {
		defer n.stop()
	}
	all := strings.Join(urls, ",")
	ctx, cancel := context.WithTimeout(context.Background(), loadFor+3*time.Minute)
	defer cancel()
	var err error
	var probe *nats.Conn
	waitFor(t, "nats servers", 30*time.Second, func() bool {
		probe, err = bus.Connect(ctx, bus.ConnConfig{URL: all, Name: "clustertest", User: access.Admin, Password: password(access.Admin)}, slog.New(slog.DiscardHandler))
		return err == nil
	})
	defer probe.Close()
	js, _ := jetstream.New(probe)
	waitFor(t, "jetstream meta leader", 30*time.Second, func() bool {
		c, cl := context.WithTimeout(ctx, time.Second)
		defer cl()
		_, err := js.AccountInfo(c)
		return err == nil
	})

	seed, _ := filepath.Abs("../../../../testdata/qubes.xml")
	socket := filepath.Join(dir, "qubesd.sock")
	// Every service as its own user (deploy/nats's permissions); the streams and
	// buckets made first by the admin, as a deployment does (qubesbus setup).
	svc := func(name, id string, extra ...string) *proc {
		args := append([]string{qb, "serve", name, "--nats-url", all, "--host", "lab", "--replicas", "3",
			"--data-dir", filepath.Join(dir, "data-"+id), "--qubes-xml", seed, "--socket", socket, "--nats-user", name}, extra...)
		return &proc{name: id, args: args, env: []string{"QUBESBUS_NATS_PASSWORD=" + password(name)}}
	}
	waitFor(t, "qubesbus setup", 60*time.Second, func() bool {
		setup := exec.CommandContext(ctx, qb, "setup", "--nats-url", all, "--replicas", "3", "--nats-user", access.Admin)
		setup.Env = append(os.Environ(), "QUBESBUS_NATS_PASSWORD="+password(access.Admin))
		out, err := setup.CombinedOutput()
		if err != nil {
			t.Logf("setup: %v: %s", err, out)
		}
		return err == nil
	})
	persistence := []*proc{svc("persistence", "persistence-a"), svc("persistence", "persistence-b")}
	properties := []*proc{svc("properties", "properties-a"), svc("properties", "properties-b")}
	// The storage instances share one data dir: their file pools are the host's
	// /var/lib/qubes, one filesystem whichever instance serves a call.
	storageProc := func(id string) *proc {
		p := svc("storage", id)
		for i, a := range p.args {
			if a == filepath.Join(dir, "data-"+id) {
				p.args[i] = filepath.Join(dir, "data-storage")
			}
		}
		return p
	}
	storage := []*proc{storageProc("storage-a"), storageProc("storage-b")}
	hypervisor := svc("hypervisor", "hypervisor")
	// Device records are in the QUBES_DEVICES bucket, so two instances share the host.
	devices := []*proc{svc("devices", "devices-a"), svc("devices", "devices-b")}
	lifecycle := []*proc{svc("vmlifecycle", "vmlifecycle-a"), svc("vmlifecycle", "vmlifecycle-b")}
	gateway := svc("gateway", "gateway")
	dump := func() {
		all := append(append(append(append(append(append([]*proc{hypervisor}, devices...), nodes...), persistence...), properties...), storage...), append(lifecycle, gateway)...)
		for _, p := range all {
			if p.log != nil {
				t.Logf("--- %s ---\n%s", p.name, lastLines(p.log.String(), 15))
			}
		}
		// QUBESBUS_CLUSTER_LOGS=DIR keeps every process's whole log there, with the
		// goroutines of each qubesbus process (SIGQUIT) at the moment of the failure.
		if dir := os.Getenv("QUBESBUS_CLUSTER_LOGS"); dir != "" {
			for _, p := range all {
				if p.log == nil {
					continue
				}
				if p.args[0] == qb {
					p.quit()
				}
				if err := os.WriteFile(filepath.Join(dir, p.name+".log"), []byte(p.log.String()), 0o644); err != nil {
					t.Log(err)
				}
			}
			t.Logf("whole logs in %s", dir)
		}
	}
	// Start order: each group needs the ones before, so it starts once they answer
	// pings. vmlifecycle-a starts first and holds the host's lease; b stands by (and so
	// does not answer).
	serving := func(name string, n int) func() bool {
		return func() bool { return instances(probe, name) >= n }
	}
	for _, g := range []struct {
		procs []*proc
		ready func() bool
	}{
		{persistence[:1], serving("qubesbus-persistence", 1)},
		{persistence[1:], serving("qubesbus-persistence", 2)},
		{[]*proc{hypervisor}, serving("qubesbus-hypervisor", 1)},
		{lifecycle[:1], serving("qubesbus-vmlifecycle", 1)},
		{lifecycle[1:], nil},
		{storage, serving("qubesbus-storage", 2)},
		{devices, serving("qubesbus-devices", 2)},
		{properties, serving("qubesbus-properties", 2)},
		{[]*proc{gateway}, nil},
	} {
		for _, p := range g.procs {
			p.start(t)
			defer p.stop()
		}
		if g.ready != nil {
			waitFor(t, g.procs[0].name+" serving", 60*time.Second, func() bool {
				for _, p := range g.procs {
					if p.exited() {
						dump()
						t.Fatalf("%s exited", p.name)
					}
				}
				return g.ready()
			})
		}
	}
	waitFor(t, "the gateway", 60*time.Second, func() bool {
		b, err := call(socket, "admin.vm.List+ dom0 name dom0\x00", 5*time.Second)
		return err == nil && bytes.HasPrefix(b, []byte("0\x00dom0"))
	})
	for _, name := range []string{"qubesbus-properties", "qubesbus-storage", "qubesbus-devices"} {
		if n := instances(probe, name); n != 2 {
			dump()
			t.Fatalf("%d %s instances, want 2", n, name)
		}
	}

	// The lifecycle lease's holder is hostname-pid of the instance that serves.
	holder := func() string {
		c, cl := context.WithTimeout(ctx, 5*time.Second)
		defer cl()
		kv, err := js.KeyValue(c, "QUBES_LEASES")
		if err != nil {
			return ""
		}
		e, err := kv.Get(c, "vmlifecycle.lab")
		if err != nil {
			return ""
		}
		return string(e.Value())
	}
	pidOf := func(p *proc) string {
		p.mu.Lock()
		defer p.mu.Unlock()
		return fmt.Sprintf("-%d", p.cmd.Process.Pid)
	}
	waitFor(t, "vmlifecycle-a to hold the lease", 30*time.Second, func() bool { return strings.HasSuffix(holder(), pidOf(lifecycle[0])) })

	// Event subscribers that stay connected through every fault.
	type seen struct {
		mu     sync.Mutex
		vals   map[string][]string // feature → values in arrival order
		starts int                 // domain-start of personal
	}
	subs := make([]*seen, 2)
	for i := range subs {
		s := &seen{vals: map[string][]string{}}
		subs[i] = s
		c, err := net.Dial("unix", socket)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write([]byte("admin.Events+ dom0 name dom0\x00"))
		c.(*net.UnixConn).CloseWrite()
		ready := make(chan struct{})
		go readEvents(c, ready, func(subject, event string, kv []string) {
			switch {
			case subject == "work" && strings.HasPrefix(event, "domain-feature-set:load.") && len(kv) >= 4:
				s.mu.Lock()
				s.vals[kv[1]] = append(s.vals[kv[1]], kv[3])
				s.mu.Unlock()
			case subject == "personal" && event == "domain-start":
				s.mu.Lock()
				s.starts++
				s.mu.Unlock()
			}
		})
		select {
		case <-ready:
		case <-time.After(20 * time.Second):
			t.Fatal("no connection-established")
		}
	}

	var cnt counters
	const writers, readers = 10, 10
	acked := make([][]int, writers)
	attempted := make([]int, writers)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for v := 1; ; v++ {
				select {
				case <-stop:
					return
				default:
				}
				attempted[w] = v
				cnt.writes.Add(1)
				b, err := call(socket, fmt.Sprintf("admin.vm.feature.Set+load.w%d dom0 name work\x00%d", w, v), 30*time.Second)
				if err == nil && string(b) == "0\x00" {
					cnt.writeAcked.Add(1)
					acked[w] = append(acked[w], v)
				} else {
					cnt.writeFails.Add(1)
					time.Sleep(50 * time.Millisecond)
				}
			}
		}()
	}
	// The power cycler starts and kills one qube over and over. A power call is a
	// change, never retried, so calls made while the lifecycle fails over may fail.
	// A start acknowledged while the qube is known to be halted (after an acknowledged
	// kill) must show up as a domain-start event; after a failed call the qube may
	// still run, and starting a running qube succeeds with no event, as in qubesd.
	var powerCalls, powerFails, startsAcked atomic.Int64
	wg.Add(1)
	go func() {
		defer wg.Done()
		halted := true
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			op := "admin.vm.Start"
			if i%2 == 1 {
				op = "admin.vm.Kill"
			}
			powerCalls.Add(1)
			b, err := call(socket, op+"+ dom0 name personal\x00", 30*time.Second)
			ok := err == nil && string(b) == "0\x00"
			if ok && op == "admin.vm.Start" && halted {
				startsAcked.Add(1)
			}
			halted = ok && op == "admin.vm.Kill"
			if !ok {
				if powerFails.Load() < 3 {
					t.Logf("%s: power call %s failed: %q %v", time.Now().Format("15:04:05.000"), op, firstBytes(b), err)
				}
				powerFails.Add(1)
				time.Sleep(100 * time.Millisecond)
			}
		}
	}()
	var readFailures []string
	var rfMu sync.Mutex
	for r := 0; r < readers; r++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			reqs := []string{"admin.vm.List+ dom0 name dom0\x00", "admin.vm.property.Get+label dom0 name work\x00",
				"admin.vm.feature.List+ dom0 name work\x00", "admin.vm.CurrentState+ dom0 name work\x00",
				"admin.vm.volume.List+ dom0 name work\x00", "admin.pool.List+ dom0 name dom0\x00"}
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				cnt.reads.Add(1)
				b, err := call(socket, reqs[i%len(reqs)], 30*time.Second)
				if err != nil || !bytes.HasPrefix(b, []byte("0\x00")) {
					cnt.readFails.Add(1)
					rfMu.Lock()
					readFailures = append(readFailures, fmt.Sprintf("%s %q %v", time.Now().Format("15:04:05.000"), firstBytes(b), err))
					rfMu.Unlock()
				}
			}
		}()
	}

	step := loadFor / 8
	faults := []struct {
		what string
		do   func()
	}{
		{"kill -9 nats node n3", func() { nodes[2].kill() }},
		{"restart n3", func() { nodes[2].start(t) }},
		// vmlifecycle-a holds the lease: b takes over once it expires.
		{"kill -9 persistence-a, properties-a, vmlifecycle-a, storage-a", func() {
			persistence[0].kill()
			properties[0].kill()
			lifecycle[0].kill()
			storage[0].kill()
			// b takes the lease over once a's expires.
			waitFor(t, "vmlifecycle-b to take the lease over", 30*time.Second, func() bool { return strings.HasSuffix(holder(), pidOf(lifecycle[1])) })
			t.Logf("%s: vmlifecycle-b holds the lease", time.Now().Format("15:04:05.000"))
		}},
		{"restart persistence-a, properties-a, vmlifecycle-a, storage-a", func() {
			persistence[0].start(t)
			properties[0].start(t)
			lifecycle[0].start(t)
			storage[0].start(t)
		}},
		{"kill -9 nats node n1", func() { nodes[0].kill() }},
		{"restart n1", func() { nodes[0].start(t) }},
	}
	for _, f := range faults {
		time.Sleep(step)
		t.Logf("%s: %s", time.Now().Format("15:04:05.000"), f.what)
		f.do()
	}
	time.Sleep(loadFor - step*time.Duration(len(faults)))
	close(stop)
	wg.Wait()

	// Every acknowledged write is stored and was seen, in order, by every subscriber.
	lost := 0
	for w := 0; w < writers; w++ {
		if len(acked[w]) == 0 {
			continue
		}
		last := acked[w][len(acked[w])-1]
		b, err := call(socket, fmt.Sprintf("admin.vm.feature.Get+load.w%d dom0 name work\x00", w), 30*time.Second)
		got, _ := strconv.Atoi(strings.TrimPrefix(string(b), "0\x00"))
		// A later write may have been applied although its reply was lost.
		if err != nil || got < last || got > attempted[w] {
			lost++
			t.Errorf("writer %d: stored %q, last acknowledged %d", w, b, last)
		}
	}
	// Wait (bounded) until the subscribers have every acknowledged change's event: after
	// a node loss the gateway's feed may take a while to resume (JetStream elects its
	// leaders again), and the events arrive then.
	missing := func(report bool) int {
		n := 0
		for i, s := range subs {
			s.mu.Lock()
			if s.starts < int(startsAcked.Load()) {
				n += int(startsAcked.Load()) - s.starts
				if report {
					t.Errorf("subscriber %d saw %d domain-start of personal, %d starts were acknowledged", i, s.starts, startsAcked.Load())
				}
			}
			for w := 0; w < writers; w++ {
				have := map[string]bool{}
				for _, v := range s.vals[fmt.Sprintf("load.w%d", w)] {
					have[v] = true
				}
				for _, v := range acked[w] {
					if !have[strconv.Itoa(v)] {
						n++
						if report && n < 5 {
							t.Errorf("subscriber %d never saw load.w%d=%d", i, w, v)
						}
					}
				}
			}
			s.mu.Unlock()
		}
		return n
	}
	for deadline := time.Now().Add(45 * time.Second); missing(false) > 0 && time.Now().Before(deadline); {
		time.Sleep(100 * time.Millisecond)
	}
	unseen := missing(true)
	t.Logf("power calls %d (failed %d during failover, acknowledged starts %d)", powerCalls.Load(), powerFails.Load(), startsAcked.Load())
	t.Logf("reads %d (failed %d), writes %d (acknowledged %d, failed %d), acknowledged writes lost %d, events missed %d",
		cnt.reads.Load(), cnt.readFails.Load(), cnt.writes.Load(), cnt.writeAcked.Load(), cnt.writeFails.Load(), lost, unseen)
	if n := cnt.readFails.Load(); n > 0 {
		for _, f := range readFailures[:min(len(readFailures), 10)] {
			t.Log("read failure:", f)
		}
		t.Errorf("%d reads failed beyond the retry window", n)
	}
	if t.Failed() {
		dump()
	}
}

// readEvents parses event frames: subject, event, then key/value pairs.
func readEvents(r io.Reader, ready chan<- struct{}, f func(subject, event string, kv []string)) {
	buf := make([]byte, 0, 1<<16)
	tmp := make([]byte, 1<<15)
	first := true
	for {
		n, err := r.Read(tmp)
		buf = append(buf, tmp[:n]...)
		for {
			fields, used := parseFrame(buf)
			if used == 0 {
				break
			}
			buf = buf[used:]
			if first {
				first = false
				close(ready)
				continue
			}
			f(fields[0], fields[1], fields[2:])
		}
		if err != nil {
			return
		}
	}
}

// parseFrame returns a whole frame's fields and its length, or 0 if incomplete.
func parseFrame(b []byte) ([]string, int) {
	if len(b) < 2 || b[0] != '1' || b[1] != 0 {
		return nil, 0
	}
	i := 2
	var fields []string
	for {
		j := bytes.IndexByte(b[i:], 0)
		if j < 0 {
			return nil, 0
		}
		s := string(b[i : i+j])
		i += j + 1
		if len(fields) >= 2 && len(fields)%2 == 0 && s == "" {
			return fields, i
		}
		fields = append(fields, s)
	}
}

func firstBytes(b []byte) []byte { return b[:min(len(b), 80)] }

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}
