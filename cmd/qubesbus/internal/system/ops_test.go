package system

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/bus/embedded"
	"github.com/qubesbus/qubesbus/bus/rpc"
)

// get fetches path from the ops handler: status and body.
func get(t *testing.T, srv *httptest.Server, path string) (int, string) {
	t.Helper()
	return bustest.HTTPGet(t, srv.URL+path)
}

// TestOpsEndpoints: /healthz answers, /readyz is ready once the host serves, and
// /metrics counts a call, the events of a change, the qubes.xml write and the lease.
func TestOpsEndpoints(t *testing.T) {
	reg := NewRegistry()
	var root string
	sys := startSystem(t, storageRoot(t, &root), func(c *Config) { c.Metrics = reg })
	srv := httptest.NewServer(OpsHandler(reg, sys.Ready))
	defer srv.Close()

	if code, body := get(t, srv, "/healthz"); code != 200 || body != "ok\n" {
		t.Errorf("/healthz: %d %q", code, body)
	}
	code, body := get(t, srv, "/readyz")
	if code != 200 || !strings.HasSuffix(body, "ready\n") || !strings.Contains(body, "ok   lifecycle lease: held") {
		t.Errorf("/readyz: %d\n%s", code, body)
	}
	// Every service of the process: its connection and the replica it reads.
	for _, name := range Services {
		if want := "ok   nats qubesbus-" + name + "-test: CONNECTED"; !strings.Contains(body, want) {
			t.Errorf("/readyz lacks %q:\n%s", want, body)
		}
	}
	for _, name := range []string{"vmlifecycle", "storage", "properties", "devices", "backup"} {
		if want := "ok   replica " + name + ": revision "; !strings.Contains(body, want) {
			t.Errorf("/readyz lacks %q:\n%s", want, body)
		}
	}
	roundTrip(t, sys.Socket, []byte("admin.vm.List+ dom0 name dom0\x00"))
	roundTrip(t, sys.Socket, []byte("admin.vm.feature.Set+ops dom0 name work\x00on"))
	// The events of storage and devices count too.
	wantReply(t, sys, "admin.pool.Add+lvm_thin dom0 name dom0\x00name=thin\nvolume_group=qubes_dom0\nthin_pool=vm-pool", "0\x00")
	wantReply(t, sys, "admin.vm.device.pci.Assign+dom0+00_1e.0 dom0 name personal\x00"+
		"device_id='*' port_id='00_1e.0' devclass='pci' backend_domain='dom0' mode='required' frontend_domain='personal'", "0\x00")
	// qubes.xml follows the reply, in the background.
	waitWritten(t, sys)
	_, body = get(t, srv, "/metrics")
	for _, want := range []string{
		`qubesbus_api_calls_total{method="admin.vm.List",outcome="ok"} 1`,
		`qubesbus_api_calls_total{method="admin.vm.feature.Set",outcome="ok"} 1`,
		`qubesbus_api_call_duration_seconds_count{method="admin.vm.List"} 1`,
		`qubesbus_events_published_total{type="domain-feature-set"} 1`,
		`qubesbus_events_published_total{type="pool-add"} 1`,
		`qubesbus_events_published_total{type="device-assign"} 1`,
		`qubesbus_replica_lag_revisions{service="storage"} 0`,
		`qubesbus_replica_lag_revisions{service="devices"} 0`,
		`qubesbus_replica_lag_revisions{service="backup"} 0`,
		`qubesbus_admin_events_subscribers 0`,
		`qubesbus_admin_events_relayed_total{path="published"} 0`,
		`qubesbus_admin_events_relayed_total{path="stored"} 0`,
		`qubesbus_replica_lag_revisions{service="properties"} 0`,
		`qubesbus_lifecycle_lease_held 1`,
		`qubesbus_nats_connected{conn="qubesbus-gateway-test"} 1`,
		`go_goroutines `,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	if !strings.Contains(body, "qubesbus_qubes_xml_writes_total ") || strings.Contains(body, "qubesbus_qubes_xml_writes_total 0\n") {
		t.Errorf("/metrics: no qubes.xml write counted")
	}
	checkREADMENamesMetrics(t, body)
}

// checkREADMENamesMetrics: the README's table names every qubesbus metric a scrape
// shows, so that it does not drift from what is exported.
func checkREADMENamesMetrics(t *testing.T, scrape string) {
	t.Helper()
	readme, err := os.ReadFile(filepath.Join(repoTestdata, "..", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, l := range strings.Split(scrape, "\n") {
		name, ok := strings.CutPrefix(l, "# TYPE qubesbus_")
		if !ok {
			continue
		}
		n++
		name = "qubesbus_" + strings.Fields(name)[0]
		if !strings.Contains(string(readme), "`"+name+"`") {
			t.Errorf("README.md does not name the metric %s", name)
		}
	}
	if n < 12 {
		t.Errorf("only %d qubesbus metrics in the scrape", n)
	}
}

// TestReadyzFollowsTheConnection: on an external NATS that goes away, /readyz says
// not ready while the connections are broken, and ready again once they have
// reconnected (and resubscribed: the replicas are caught up and a call is answered).
func TestReadyzFollowsTheConnection(t *testing.T) {
	dir := t.TempDir()
	start := func(port int) *server.Server {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		ns, err := embedded.Start(ctx, embedded.Config{StoreDir: filepath.Join(dir, "nats"), Port: port})
		if err != nil {
			t.Fatal(err)
		}
		return ns
	}
	ns := start(-1)
	addr := ns.Addr().String()
	var p int
	if _, err := fmt.Sscanf(addr[strings.LastIndex(addr, ":")+1:], "%d", &p); err != nil {
		t.Fatal(err)
	}
	reg := NewRegistry()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	sys, err := Start(ctx, Config{Socket: filepath.Join(dir, "qubesd.sock"), DataDir: filepath.Join(dir, "data"),
		QubesXML: filepath.Join(repoTestdata, "qubes.xml"), HostID: "test", NATSURL: ns.ClientURL(), Metrics: reg},
		slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if ns != nil {
			ns.Shutdown()
		}
	}()
	defer sys.Stop()
	srv := httptest.NewServer(OpsHandler(reg, sys.Ready))
	defer srv.Close()
	status := func(want int) func() error {
		return func() error {
			if code, body := get(t, srv, "/readyz"); code != want {
				return fmt.Errorf("/readyz %d, want %d:\n%s", code, want, body)
			}
			return nil
		}
	}
	bustest.CheckFor(t, 10*time.Second, 50*time.Millisecond, status(http.StatusOK))

	ns.Shutdown()
	ns.WaitForShutdown()
	bustest.CheckFor(t, 10*time.Second, 50*time.Millisecond, status(http.StatusServiceUnavailable))
	if _, body := get(t, srv, "/metrics"); !strings.Contains(body, `qubesbus_nats_connected{conn="qubesbus-gateway-test"} 0`) {
		t.Errorf("/metrics while disconnected:\n%s", grep(body, "qubesbus_nats_connected"))
	}

	ns = start(p)
	bustest.CheckFor(t, 30*time.Second, 100*time.Millisecond, status(http.StatusOK))
	if out := roundTrip(t, sys.Socket, []byte("admin.vm.List+ dom0 name dom0\x00")); !strings.HasPrefix(string(out), "0\x00") {
		t.Errorf("call after reconnect: %q", out)
	}
	if _, body := get(t, srv, "/metrics"); !strings.Contains(body, `qubesbus_nats_reconnects_total{conn="qubesbus-gateway-test"} 1`) {
		t.Errorf("/metrics after reconnect:\n%s", grep(body, "qubesbus_nats_reconnects_total"))
	}
}

func grep(s, substr string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, substr) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// cutProxy relays TCP connections to target; cut closes the open ones and refuses
// new ones (accepts and closes them) until restore.
type cutProxy struct {
	l      net.Listener
	target string
	mu     sync.Mutex
	open   []net.Conn
	refuse bool
}

func newCutProxy(t *testing.T, target string) *cutProxy {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &cutProxy{l: l, target: target}
	var wg sync.WaitGroup
	t.Cleanup(func() {
		l.Close()
		p.cut()
		wg.Wait()
	})
	wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			wg.Go(func() { p.relay(c) })
		}
	})
	return p
}

func (p *cutProxy) relay(c net.Conn) {
	p.mu.Lock()
	if p.refuse {
		p.mu.Unlock()
		c.Close()
		return
	}
	s, err := net.Dial("tcp", p.target)
	if err != nil {
		p.mu.Unlock()
		c.Close()
		return
	}
	p.open = append(p.open, c, s)
	p.mu.Unlock()
	done := make(chan struct{})
	go func() {
		_, _ = io.Copy(s, c)
		s.Close()
		close(done)
	}()
	_, _ = io.Copy(c, s)
	c.Close()
	<-done
}

func (p *cutProxy) URL() string { return "nats://" + p.l.Addr().String() }

func (p *cutProxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.refuse = true
	for _, c := range p.open {
		c.Close()
	}
	p.open = nil
}

func (p *cutProxy) restore() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.refuse = false
}

// TestReadyzFollowsOneService: one service's connection broken (storage's, through a
// proxy that then refuses it) makes /readyz not ready and says which; once it has
// reconnected the host is ready again and storage answers.
func TestReadyzFollowsOneService(t *testing.T) {
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ns, err := embedded.Start(ctx, embedded.Config{StoreDir: filepath.Join(dir, "nats"), Port: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		ns.Shutdown()
		ns.WaitForShutdown()
	}()
	proxy := newCutProxy(t, ns.Addr().String())
	reg := NewRegistry()
	sys, err := Start(ctx, Config{Socket: filepath.Join(dir, "qubesd.sock"), DataDir: filepath.Join(dir, "data"),
		QubesXML: filepath.Join(repoTestdata, "qubes.xml"), HostID: "test", NATSURL: ns.ClientURL(), Metrics: reg,
		ServiceNATSURLs: map[string]string{string(rpc.Storage): proxy.URL()}}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer sys.Stop()
	srv := httptest.NewServer(OpsHandler(reg, sys.Ready))
	defer srv.Close()
	const storageConn = "qubesbus-storage-test"
	var nc *nats.Conn
	for _, c := range sys.Conns() {
		if c.Opts.Name == storageConn {
			nc = c
		}
	}
	if nc == nil {
		t.Fatalf("no connection %s", storageConn)
	}
	if code, body := get(t, srv, "/readyz"); code != http.StatusOK {
		t.Fatalf("/readyz before: %d\n%s", code, body)
	}

	broken := nc.StatusChanged(nats.RECONNECTING)
	proxy.cut()
	waitStatus(t, broken)
	// The proxy refuses it until restored: the check cannot race a reconnect.
	code, body := get(t, srv, "/readyz")
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "FAIL nats "+storageConn+": RECONNECTING") ||
		!strings.HasSuffix(body, "not ready\n") {
		t.Errorf("/readyz while storage's connection is broken: %d\n%s", code, body)
	}
	if strings.Count(body, "FAIL ") != 1 {
		t.Errorf("/readyz: more than storage's connection fails:\n%s", body)
	}
	if _, m := get(t, srv, "/metrics"); !strings.Contains(m, `qubesbus_nats_connected{conn="`+storageConn+`"} 0`) {
		t.Errorf("/metrics while broken:\n%s", grep(m, "qubesbus_nats_connected"))
	}

	back := nc.StatusChanged(nats.CONNECTED)
	proxy.restore()
	waitStatus(t, back)
	if code, body := get(t, srv, "/readyz"); code != http.StatusOK {
		t.Errorf("/readyz after reconnect: %d\n%s", code, body)
	}
	if out := roundTrip(t, sys.Socket, []byte("admin.pool.List+ dom0 name dom0\x00")); !strings.HasPrefix(string(out), "0\x00") {
		t.Errorf("storage call after reconnect: %q", out)
	}
}

// waitStatus waits for a connection's status change on ch (nats.Conn.StatusChanged).
func waitStatus(t *testing.T, ch <-chan nats.Status) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(30 * time.Second):
		t.Fatal("no status change")
	}
}

// TestNATSMonitoring: NATSHTTP opens the embedded server's monitoring endpoint, where
// /varz answers and /connz lists the services' connections; without it nothing
// listens, and an external server is refused it.
func TestNATSMonitoring(t *testing.T) {
	sys := startSystem(t, func(c *Config) { c.NATSHTTP = "127.0.0.1:0"; c.NATSPort = 0 })
	addr := sys.NATS.MonitorAddr()
	if addr == nil {
		t.Fatal("no monitoring listener")
	}
	base := "http://" + addr.String()
	if code, body := bustest.HTTPGet(t, base+"/varz"); code != 200 || !strings.Contains(body, `"server_id"`) {
		t.Errorf("/varz: %d %.200s", code, body)
	}
	if code, body := bustest.HTTPGet(t, base+"/connz"); code != 200 || !strings.Contains(body, `"qubesbus-gateway-test"`) {
		t.Errorf("/connz: %d %.300s", code, body)
	}

	if a := startSystem(t).NATS.MonitorAddr(); a != nil {
		t.Errorf("monitoring on %s without NATSHTTP", a)
	}
	err := Config{Socket: "s", DataDir: "d", HostID: "h", NATSURL: "nats://127.0.0.1:4222", NATSHTTP: ":8222"}.Validate()
	if !errors.Is(err, ErrNATSHTTPExternal) {
		t.Errorf("external server with NATSHTTP: %v", err)
	}
}

// TestServeOneServiceReady: a single service of `qubesbus serve` (storage, devices,
// backup) reports its connection and the replica it serves from, and its replica's
// metrics.
func TestServeOneServiceReady(t *testing.T) {
	ns := bustest.RunJetStream(t)
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cfg := Config{Socket: filepath.Join(dir, "qubesd.sock"), DataDir: filepath.Join(dir, "data"),
		QubesXML: filepath.Join(repoTestdata, "qubes.xml"), HostID: "test", NATSURL: ns.ClientURL()}
	log := slog.New(slog.DiscardHandler)
	for _, name := range []string{"persistence", "hypervisor"} { // what they ask at start
		one, err := StartService(ctx, name, cfg, log)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = one.Stop() })
	}
	for _, name := range []string{"storage", "devices", "backup"} {
		t.Run(name, func(t *testing.T) {
			c := cfg
			reg := NewRegistry()
			c.Metrics = reg
			sys, err := StartService(ctx, name, c, log)
			if err != nil {
				t.Fatal(err)
			}
			defer sys.Stop()
			srv := httptest.NewServer(OpsHandler(reg, sys.Ready))
			defer srv.Close()
			code, body := get(t, srv, "/readyz")
			for _, want := range []string{"ok   nats qubesbus-" + name + "-test: CONNECTED", "ok   replica " + name + ": revision "} {
				if !strings.Contains(body, want) {
					t.Errorf("/readyz lacks %q", want)
				}
			}
			if code != http.StatusOK {
				t.Errorf("/readyz: %d\n%s", code, body)
			}
			if _, m := get(t, srv, "/metrics"); !strings.Contains(m, `qubesbus_replica_lag_revisions{service="`+name+`"} 0`) {
				t.Errorf("/metrics:\n%s", grep(m, "qubesbus_replica"))
			}
		})
	}
}
