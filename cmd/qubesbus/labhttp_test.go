package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/qubesbus/qubesbus/bus/bustest"
)

// addrLog is a slog handler that hands on the addr of the records whose message is
// one of msgs (the listeners a command opens on port 0).
type addrLog struct {
	msgs map[string]chan string
}

func newAddrLog(msgs ...string) *addrLog {
	h := &addrLog{msgs: map[string]chan string{}}
	for _, m := range msgs {
		h.msgs[m] = make(chan string, 1)
	}
	return h
}

func (h *addrLog) Enabled(context.Context, slog.Level) bool { return true }
func (h *addrLog) WithAttrs([]slog.Attr) slog.Handler       { return h }
func (h *addrLog) WithGroup(string) slog.Handler            { return h }

func (h *addrLog) Handle(_ context.Context, r slog.Record) error {
	ch, ok := h.msgs[r.Message]
	if !ok {
		return nil
	}
	r.Attrs(func(a slog.Attr) bool {
		if a.Key == "addr" {
			select {
			case ch <- a.Value.String():
			default:
			}
			return false
		}
		return true
	})
	return nil
}

// wait is the addr of msg's record.
func (h *addrLog) wait(t *testing.T, msg string) string {
	t.Helper()
	select {
	case a := <-h.msgs[msg]:
		return a
	case <-time.After(lineWait):
		t.Fatalf("no %q in the log", msg)
		return ""
	}
}

// lineWriter passes on each line written to it, as far as lines has room.
type lineWriter struct {
	mu    sync.Mutex
	buf   bytes.Buffer
	lines chan string
}

func (w *lineWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf.Write(p)
	for {
		line, err := w.buf.ReadString('\n')
		if err != nil { // a partial line: keep it for the next write
			w.buf.Reset()
			w.buf.WriteString(line)
			return len(p), nil
		}
		select {
		case w.lines <- strings.TrimSuffix(line, "\n"):
		default: // more lines than the test reads: never hold the command up
		}
	}
}

// TestLabHTTP: `lab --http` serves every host's readiness checks, their metrics with a
// host label each and one web view of all of them; --nats-http opens the lab's NATS
// monitoring endpoint.
func TestLabHTTP(t *testing.T) {
	const hosts = 2
	log := newAddrLog("http ready", "nats monitoring ready")
	stdout := &lineWriter{lines: make(chan string, hosts)}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan int, 1)
	go func() {
		done <- labCmd(ctx, []string{"--hosts", fmt.Sprint(hosts), "--qubes", "1", "--dir", t.TempDir(),
			"--qubes-xml", "../../testdata/qubes.xml", "--nats-port", "-1", "--parallel", "2",
			"--http", "127.0.0.1:0", "--nats-http", "127.0.0.1:0"}, stdout, io.Discard, slog.New(log))
	}()
	base := "http://" + log.wait(t, "http ready")
	monitor := "http://" + log.wait(t, "nats monitoring ready")
	// The lab prints one line per host once every host serves.
	var ids []string
	for range hosts {
		select {
		case l := <-stdout.lines:
			ids = append(ids, strings.Fields(l)[0])
		case code := <-done:
			t.Fatalf("lab exited %d", code)
		case <-time.After(lineWait):
			t.Fatal("lab not ready")
		}
	}

	code, ready := bustest.HTTPGet(t, base+"/readyz")
	if code != http.StatusOK || !strings.HasSuffix(ready, "ready\n") {
		t.Errorf("/readyz: %d\n%s", code, ready)
	}
	_, metrics := bustest.HTTPGet(t, base+"/metrics")
	for _, id := range ids {
		for _, want := range []string{
			"ok   " + id + " nats qubesbus-storage-" + id + ": CONNECTED",
			"ok   " + id + " nats qubesbus-gateway-" + id + ": CONNECTED",
			"ok   " + id + " replica storage: revision ",
			"ok   " + id + " replica vmlifecycle: revision ",
			"ok   " + id + " lifecycle lease: held",
		} {
			if !strings.Contains(ready, want) {
				t.Errorf("/readyz lacks %q:\n%s", want, ready)
			}
		}
		for _, want := range []string{
			`qubesbus_nats_connected{conn="qubesbus-gateway-` + id + `",host="` + id + `"} 1`,
			`qubesbus_lifecycle_lease_held{host="` + id + `"} 1`,
			`qubesbus_replica_lag_revisions{host="` + id + `",service="properties"} 0`,
			`qubesbus_admin_events_subscribers{host="` + id + `"} 0`,
		} {
			if !strings.Contains(metrics, want) {
				t.Errorf("/metrics lacks %s", want)
			}
		}
	}
	// The web view: its page, and every host on the bus in the list the page shows.
	if code, page := bustest.HTTPGet(t, base+"/"); code != http.StatusOK || !strings.Contains(page, "<title>qubesbus</title>") {
		t.Errorf("/: %d %.200s", code, page)
	}
	// The page's feed of hosts (/state, server-sent events): every host of the lab.
	sctx, stop := context.WithTimeout(ctx, lineWait)
	defer stop()
	req, err := http.NewRequestWithContext(sctx, http.MethodGet, base+"/state", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for sc := bufio.NewScanner(resp.Body); len(seen) < hosts && sc.Scan(); {
		for _, id := range ids {
			if strings.HasPrefix(sc.Text(), "data: ") && strings.Contains(sc.Text(), `"id":"`+id+`"`) {
				seen[id] = true
			}
		}
	}
	stop()
	resp.Body.Close()
	if len(seen) < hosts {
		t.Errorf("/state showed hosts %v of %v", seen, ids)
	}
	if code, varz := bustest.HTTPGet(t, monitor+"/varz"); code != http.StatusOK || !strings.Contains(varz, `"server_id"`) {
		t.Errorf("nats /varz: %d %.200s", code, varz)
	}

	cancel()
	select {
	case code := <-done:
		if code != 0 {
			t.Errorf("lab exited %d", code)
		}
	case <-time.After(promptly):
		t.Fatal("lab did not stop")
	}
}
