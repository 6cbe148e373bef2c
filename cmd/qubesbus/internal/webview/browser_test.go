package webview_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/coder/websocket/wsjson"

	"github.com/qubesbus/qubesbus/bus/bustest"
)

// TestBrowserSeesAStart renders the page in headless Chromium (Debian's chromium
// package; .ci/run installs it), sees work Halted, starts it over the socket, and sees the
// page show it Running without a reload. Skipped only where chromium is absent.
func TestBrowserSeesAStart(t *testing.T) {
	bin, err := exec.LookPath("chromium")
	if err != nil {
		if os.Getenv("CI") == "true" { // .ci/run installs it: never skipped there
			t.Fatal("chromium is not installed, and CI installs it")
		}
		t.Skip("chromium is not installed (apt-get install chromium)")
	}
	sys, srv := startView(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*patience)
	defer cancel()
	tab := openTab(ctx, t, bin, srv.URL+"/")

	cell := `(() => { const td = document.querySelector('tr[data-host="test"][data-qube="work"] td.state'); return td ? td.textContent : ""; })()`
	waitText := func(want string) {
		t.Helper()
		bustest.CheckFor(t, patience, 50*time.Millisecond, func() error {
			got, err := tab.eval(ctx, cell)
			if err != nil {
				return err
			}
			if got != want {
				return fmt.Errorf("the page shows work as %q, want %q", got, want)
			}
			return nil
		})
	}
	waitText("Halted")
	// A mark on the page: still there afterwards, so the page was not reloaded.
	if _, err := tab.eval(ctx, `(window.qubesbusMark = "before start")`); err != nil {
		t.Fatal(err)
	}
	start(t, sys, "work")
	waitText("Running")
	if mark, err := tab.eval(ctx, `window.qubesbusMark || ""`); err != nil || mark != "before start" {
		t.Errorf("the page was reloaded (mark %q, %v)", mark, err)
	}
	// The feed shows the start too.
	bustest.CheckFor(t, patience, 50*time.Millisecond, func() error {
		got, err := tab.eval(ctx, `String(document.querySelectorAll('#events li[data-vm="work"][data-event="domain-start"]').length)`)
		if err != nil {
			return err
		}
		if got == "0" {
			return errors.New("no domain-start of work in the feed")
		}
		return nil
	})
}

// tab is one page of a headless Chromium, driven over the DevTools protocol.
type tab struct {
	conn    *websocket.Conn
	session string
	id      int
}

// openTab starts Chromium with a profile of its own and opens url in a new tab.
func openTab(ctx context.Context, t *testing.T, bin, url string) *tab {
	t.Helper()
	profile := t.TempDir()
	cmd := exec.CommandContext(ctx, bin, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
		"--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
		"--disable-dev-shm-usage", "--user-data-dir="+profile, "--remote-debugging-port=0", "about:blank")
	logFile, err := os.Create(filepath.Join(t.TempDir(), "chromium.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close() // the child keeps its own descriptor
	cmd.Stderr = logFile
	if err := cmd.Start(); err != nil {
		t.Fatalf("start chromium: %v", err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	// Chromium writes its port and the browser's DevTools path once it listens.
	var ws string
	bustest.CheckFor(t, patience, 50*time.Millisecond, func() error {
		b, err := os.ReadFile(filepath.Join(profile, "DevToolsActivePort"))
		if err != nil {
			log, _ := os.ReadFile(logFile.Name())
			return fmt.Errorf("chromium not listening yet: %w (its log: %s)", err, tail(string(log)))
		}
		lines := strings.Split(strings.TrimSpace(string(b)), "\n")
		if len(lines) != 2 {
			return fmt.Errorf("DevToolsActivePort: %q", b)
		}
		ws = "ws://127.0.0.1:" + lines[0] + lines[1]
		return nil
	})
	conn, _, err := websocket.Dial(ctx, ws, nil)
	if err != nil {
		t.Fatalf("devtools: %v", err)
	}
	conn.SetReadLimit(16 << 20)
	t.Cleanup(func() { _ = conn.CloseNow() })
	tb := &tab{conn: conn}
	var created struct {
		TargetID string `json:"targetId"`
	}
	if err := tb.call(ctx, "", "Target.createTarget", map[string]any{"url": url}, &created); err != nil {
		t.Fatalf("open %s: %v", url, err)
	}
	var attached struct {
		SessionID string `json:"sessionId"`
	}
	if err := tb.call(ctx, "", "Target.attachToTarget", map[string]any{"targetId": created.TargetID, "flatten": true}, &attached); err != nil {
		t.Fatalf("attach: %v", err)
	}
	tb.session = attached.SessionID
	return tb
}

func tail(s string) string {
	if len(s) > 400 {
		return "…" + s[len(s)-400:]
	}
	return s
}

// call sends one command and reads until its answer; the events that come meanwhile
// (none is enabled but the target's own) are skipped.
func (tb *tab) call(ctx context.Context, session, method string, params any, out any) error {
	tb.id++
	req := map[string]any{"id": tb.id, "method": method, "params": params}
	if session != "" {
		req["sessionId"] = session
	}
	cctx, cancel := context.WithTimeout(ctx, patience)
	defer cancel()
	if err := wsjson.Write(cctx, tb.conn, req); err != nil {
		return fmt.Errorf("%s: %w", method, err)
	}
	for {
		var resp struct {
			ID     int             `json:"id"`
			Result json.RawMessage `json:"result"`
			Error  *struct {
				Message string `json:"message"`
			} `json:"error"`
		}
		if err := wsjson.Read(cctx, tb.conn, &resp); err != nil {
			return fmt.Errorf("%s: %w", method, err)
		}
		if resp.ID != tb.id {
			continue
		}
		if resp.Error != nil {
			return fmt.Errorf("%s: %s", method, resp.Error.Message)
		}
		return json.Unmarshal(resp.Result, out)
	}
}

// eval evaluates a JavaScript expression whose value is a string, in the page.
func (tb *tab) eval(ctx context.Context, expr string) (string, error) {
	var res struct {
		Result struct {
			Type  string          `json:"type"`
			Value json.RawMessage `json:"value"`
		} `json:"result"`
		ExceptionDetails *struct {
			Text string `json:"text"`
		} `json:"exceptionDetails"`
	}
	if err := tb.call(ctx, tb.session, "Runtime.evaluate", map[string]any{"expression": expr, "returnByValue": true}, &res); err != nil {
		return "", err
	}
	if res.ExceptionDetails != nil {
		return "", fmt.Errorf("%s: %s", expr, res.ExceptionDetails.Text)
	}
	if res.Result.Type != "string" {
		return "", fmt.Errorf("%s: a %s, not a string", expr, res.Result.Type)
	}
	var s string
	err := json.Unmarshal(res.Result.Value, &s)
	return s, err
}
