package system

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/bus/embedded"
)

// get fetches path from the ops handler: status and body.
func get(t *testing.T, srv *httptest.Server, path string) (int, string) {
	t.Helper()
	resp, err := srv.Client().Get(srv.URL + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}

// TestOpsEndpoints: /healthz answers, /readyz is ready once the host serves, and
// /metrics counts a call, the events of a change, the qubes.xml write and the lease.
func TestOpsEndpoints(t *testing.T) {
	reg := NewRegistry()
	sys := startSystem(t, func(c *Config) { c.Metrics = reg })
	srv := httptest.NewServer(OpsHandler(reg, sys.Ready))
	defer srv.Close()

	if code, body := get(t, srv, "/healthz"); code != 200 || body != "ok\n" {
		t.Errorf("/healthz: %d %q", code, body)
	}
	code, body := get(t, srv, "/readyz")
	if code != 200 || !strings.HasSuffix(body, "ready\n") || !strings.Contains(body, "ok   lifecycle lease: held") ||
		!strings.Contains(body, "ok   replica properties") || !strings.Contains(body, "ok   replica vmlifecycle") {
		t.Errorf("/readyz: %d\n%s", code, body)
	}
	roundTrip(t, sys.Socket, []byte("admin.vm.List+ dom0 name dom0\x00"))
	roundTrip(t, sys.Socket, []byte("admin.vm.feature.Set+ops dom0 name work\x00on"))
	// qubes.xml follows the reply, in the background.
	if err := sys.Store.WaitWritten(t.Context(), sys.Store.Revision()); err != nil {
		t.Fatal(err)
	}
	_, body = get(t, srv, "/metrics")
	for _, want := range []string{
		`qubesbus_api_calls_total{method="admin.vm.List",outcome="ok"} 1`,
		`qubesbus_api_calls_total{method="admin.vm.feature.Set",outcome="ok"} 1`,
		`qubesbus_api_call_duration_seconds_count{method="admin.vm.List"} 1`,
		`qubesbus_events_published_total{type="domain-feature-set"} 1`,
		`qubesbus_admin_events_subscribers 0`,
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
