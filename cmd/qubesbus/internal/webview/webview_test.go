package webview_test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/access"
	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/system"
	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/webview"
	"github.com/qubesbus/qubesbus/schemas/configstore"
	"github.com/qubesbus/qubesbus/services/vmlifecycle/simdriver"
)

const testdata = "../../../../testdata"

// patience bounds every wait for the system to show something: generous, since
// these tests run beside others under -race on two cores.
const patience = 60 * time.Second

// startView runs a whole host ("test") with embedded NATS, and the web view of it as
// the webview role on an httptest server.
func startView(t *testing.T) (*system.System, *httptest.Server) {
	t.Helper()
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), patience)
	defer cancel()
	log := slog.New(slog.DiscardHandler)
	sys, err := system.Start(ctx, system.Config{
		Socket: filepath.Join(dir, "qubesd.sock"), DataDir: filepath.Join(dir, "data"),
		QubesXML: filepath.Join(testdata, "qubes.xml"), HostID: "test",
	}, log)
	if err != nil {
		t.Fatalf("start system: %v", err)
	}
	vctx, vcancel := context.WithCancel(context.Background())
	t.Cleanup(func() {
		vcancel()
		if err := sys.Stop(); err != nil {
			t.Errorf("stop: %v", err)
		}
	})
	nc, err := sys.ConnectAs(ctx, access.WebView, "webview-test")
	if err != nil {
		t.Fatalf("connect as webview: %v", err)
	}
	v, err := webview.Start(vctx, nc, log)
	if err != nil {
		t.Fatalf("start web view: %v", err)
	}
	srv := httptest.NewServer(v.Handler())
	// Before the view's context ends (cleanups run last-in first-out): the open
	// streams end with it, so Close does not wait for them.
	t.Cleanup(func() { vcancel(); srv.Close() })
	return sys, srv
}

// call sends one Admin API call over the socket, as dom0, and returns the answer.
func call(t *testing.T, socket, method, dest string) string {
	t.Helper()
	c, err := net.Dial("unix", socket)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(patience))
	if _, err := c.Write([]byte(method + " dom0 name " + dest + "\x00")); err != nil {
		t.Fatalf("write: %v", err)
	}
	_ = c.(*net.UnixConn).CloseWrite()
	b, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	return string(b)
}

func start(t *testing.T, sys *system.System, vm string) {
	t.Helper()
	if got := call(t, sys.Socket, "admin.vm.Start", vm); got != "0\x00" {
		t.Fatalf("admin.vm.Start %s: %q", vm, got)
	}
}

// hosts reads /api/hosts.
func hosts(srv *httptest.Server) ([]webview.Host, error) {
	resp, err := http.Get(srv.URL + "/api/hosts")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var out []webview.Host
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		return nil, err
	}
	return out, nil
}

func qubeOf(hs []webview.Host, host, vm string) (webview.Qube, error) {
	for _, h := range hs {
		if h.ID != host {
			continue
		}
		for _, q := range h.Qubes {
			if q.Name == vm {
				return q, nil
			}
		}
		return webview.Qube{}, fmt.Errorf("host %s has no qube %s (error %q)", host, vm, h.Error)
	}
	return webview.Qube{}, fmt.Errorf("no host %s in %d hosts", host, len(hs))
}

// waitState polls /api/hosts until the qube shows the state.
func waitState(t *testing.T, srv *httptest.Server, vm, state string) webview.Qube {
	t.Helper()
	var q webview.Qube
	bustest.CheckFor(t, patience, 20*time.Millisecond, func() error {
		hs, err := hosts(srv)
		if err != nil {
			return err
		}
		if q, err = qubeOf(hs, "test", vm); err != nil {
			return err
		}
		if q.State != state {
			return fmt.Errorf("%s is %s, want %s", vm, q.State, state)
		}
		return nil
	})
	return q
}

// TestHostsFollowTheBus: the host's qubes come with class, label colour and netvm,
// and a qube's power state follows its events.
func TestHostsFollowTheBus(t *testing.T) {
	sys, srv := startView(t)
	q := waitState(t, srv, "work", "Halted")
	if want := (webview.Qube{Name: "work", Class: "AppVM", State: "Halted", Label: "blue", Color: "#3465a4", NetVM: "sys-firewall"}); q != want {
		t.Errorf("work: %+v, want %+v", q, want)
	}
	hs, _ := hosts(srv)
	if dom0, err := qubeOf(hs, "test", "dom0"); err != nil || dom0.Class != "AdminVM" || dom0.State != "Running" || dom0.NetVM != "" {
		t.Errorf("dom0: %+v %v", dom0, err)
	}

	start(t, sys, "work")
	waitState(t, srv, "work", "Running")
	waitState(t, srv, "sys-firewall", "Running") // its netvm, started first
	if got := call(t, sys.Socket, "admin.vm.Pause", "work"); got != "0\x00" {
		t.Fatalf("pause: %q", got)
	}
	waitState(t, srv, "work", "Paused")
	if got := call(t, sys.Socket, "admin.vm.Kill", "work"); got != "0\x00" {
		t.Fatalf("kill: %q", got)
	}
	waitState(t, srv, "work", "Halted")

	// A configuration change: the label, from the configuration history.
	c, err := net.Dial("unix", sys.Socket)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = c.Write([]byte("admin.vm.property.Set+label dom0 name work\x00red"))
	_ = c.(*net.UnixConn).CloseWrite()
	b, _ := io.ReadAll(c)
	c.Close()
	if string(b) != "0\x00" {
		t.Fatalf("set label: %q", b)
	}
	bustest.CheckFor(t, patience, 20*time.Millisecond, func() error {
		hs, err := hosts(srv)
		if err != nil {
			return err
		}
		q, err := qubeOf(hs, "test", "work")
		if err != nil {
			return err
		}
		if q.Label != "red" || q.Color != "#cc0000" {
			return fmt.Errorf("work's label %s %s", q.Label, q.Color)
		}
		return nil
	})
}

// sseReader reads one server-sent event stream.
type sseReader struct {
	events chan [2]string // event name, data
	resp   *http.Response
}

func openSSE(t *testing.T, u string) *sseReader {
	t.Helper()
	resp, err := http.Get(u)
	if err != nil {
		t.Fatalf("GET %s: %v", u, err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("GET %s: %s %s", u, resp.Status, resp.Header.Get("Content-Type"))
	}
	r := &sseReader{events: make(chan [2]string, 1024), resp: resp}
	go func() {
		defer close(r.events)
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(nil, 1<<20)
		var name, data string
		for sc.Scan() {
			line := sc.Text()
			switch {
			case line == "":
				if name != "" {
					r.events <- [2]string{name, data}
				}
				name, data = "", ""
			case strings.HasPrefix(line, "event: "):
				name = strings.TrimPrefix(line, "event: ")
			case strings.HasPrefix(line, "data: "):
				data = strings.TrimPrefix(line, "data: ")
			}
		}
	}()
	return r
}

// next returns the next event, or fails after patience.
func (r *sseReader) next(t *testing.T) (string, string) {
	t.Helper()
	select {
	case ev, ok := <-r.events:
		if !ok {
			t.Fatal("the stream ended")
		}
		return ev[0], ev[1]
	case <-time.After(patience):
		t.Fatal("no event within the bound")
	}
	return "", ""
}

// TestEventsFeed: /events streams the events stream filtered by qube and type, and
// /state sends a host's table again when a qube's power state changes.
func TestEventsFeed(t *testing.T) {
	sys, srv := startView(t)
	waitState(t, srv, "work", "Halted")
	state := openSSE(t, srv.URL+"/state")
	feed := openSSE(t, srv.URL+"/events?"+url.Values{"host": {"test"}, "vm": {"work"}, "type": {"domain-*start"}}.Encode())
	start(t, sys, "work")

	var got []string
	for len(got) < 2 {
		name, data := feed.next(t)
		var ev webview.FeedEvent
		if name != "event" || json.Unmarshal([]byte(data), &ev) != nil {
			t.Fatalf("feed: %s %s", name, data)
		}
		if ev.Host != "test" || ev.VM != "work" || ev.Seq == 0 {
			t.Errorf("feed: %+v", ev)
		}
		got = append(got, ev.Event)
	}
	if strings.Join(got, " ") != "domain-pre-start domain-start" {
		t.Errorf("feed of work's domain-*start: %q", got)
	}

	// The state stream sends the table at once, then again until work runs.
	for {
		name, data := state.next(t)
		var h webview.Host
		if name != "host" || json.Unmarshal([]byte(data), &h) != nil {
			t.Fatalf("state: %s %s", name, data)
		}
		if q, err := qubeOf([]webview.Host{h}, "test", "work"); err == nil && q.State == "Running" {
			break
		}
	}
}

// TestEventsFeedRefusesBadQueries: untrusted query parameters are bounded and must
// be printable text and a well-formed glob.
func TestEventsFeedRefusesBadQueries(t *testing.T) {
	_, srv := startView(t)
	for _, q := range []url.Values{
		{"vm": {strings.Repeat("a", subject.MaxToken+1)}},
		{"host": {strings.Repeat("h", subject.MaxToken+1)}},
		{"type": {strings.Repeat("*", 257)}},
		{"vm": {"work\n"}},
		{"host": {"\xff"}},
		{"type": {"domain-["}},
	} {
		resp, err := http.Get(srv.URL + "/events?" + q.Encode())
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(body), "bad query") {
			t.Errorf("%v: %s %q", q, resp.Status, body)
		}
	}
	// A name of any allowed kind becomes a bounded filter.
	for _, vm := range []string{"a.b*c>", strings.Repeat("x", subject.MaxToken)} {
		f, err := webview.ParseFeedQuery(url.Values{"vm": {vm}, "host": {"*"}})
		if err != nil {
			t.Fatalf("%q: %v", vm, err)
		}
		if fl := f.Filter(); len(fl) > subject.MaxEventSubject || strings.Count(fl, ".") != 5 {
			t.Errorf("%q: filter %q", vm, fl)
		}
	}
}

// TestPageIsSelfContained: the page, its script and style are embedded and served
// with a policy that allows only them, and the script never parses markup.
func TestPageIsSelfContained(t *testing.T) {
	_, srv := startView(t)
	for path, ctype := range map[string]string{"/": "text/html", "/static/app.js": "javascript", "/static/style.css": "text/css"} {
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || !strings.Contains(resp.Header.Get("Content-Type"), ctype) {
			t.Errorf("%s: %s %s", path, resp.Status, resp.Header.Get("Content-Type"))
		}
		if csp := resp.Header.Get("Content-Security-Policy"); !strings.Contains(csp, "default-src 'none'") || !strings.Contains(csp, "script-src 'self'") {
			t.Errorf("%s: CSP %q", path, csp)
		}
		for _, bad := range []string{"http://", "https://", "innerHTML", "outerHTML", "insertAdjacentHTML", "document.write"} {
			if strings.Contains(string(body), bad) {
				t.Errorf("%s contains %q", path, bad)
			}
		}
	}
	if resp, err := http.Get(srv.URL + "/nothing-here"); err != nil || resp.StatusCode != 404 {
		t.Errorf("/nothing-here: %v %v", resp.Status, err)
	}
}

// TestRoleIsReadOnly: the webview role may not change the configuration nor call.
func TestRoleIsReadOnly(t *testing.T) {
	sys, _ := startView(t)
	host := subject.ForHost("test")
	for _, subj := range []string{configstore.ApplySubject(host, access.Properties), configstore.ApplySubject(host, access.WebView), host.API("admin.vm.Start"), host.Lab(simdriver.LabOpCrash)} {
		nc, err := sys.ConnectAs(context.Background(), access.WebView, "webview-readonly")
		if err != nil {
			t.Fatal(err)
		}
		denied := make(chan error, 4)
		nc.SetErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) { denied <- err })
		if err := nc.Publish(subj, []byte("{}")); err != nil {
			t.Fatal(err)
		}
		_ = nc.Flush()
		select {
		case err := <-denied:
			if !errors.Is(err, nats.ErrPermissionViolation) {
				t.Errorf("%s: %v", subj, err)
			}
		case <-time.After(patience):
			t.Errorf("publishing on %s was not refused", subj)
		}
		nc.Close()
	}
}
