package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"unicode/utf8"
)

func runDispatch(ctx context.Context, args ...string) (code int, stdout, stderr string) {
	var out, errb bytes.Buffer
	code = dispatch(ctx, args, strings.NewReader(""), &out, &errb)
	return code, out.String(), errb.String()
}

func TestVersion(t *testing.T) {
	for _, arg := range []string{"version", "--version"} {
		code, out, errs := runDispatch(context.Background(), arg)
		if code != 0 || errs != "" || !strings.HasPrefix(out, "qubesbus ") || !strings.Contains(out, "\nmodule ") ||
			!strings.Contains(out, "\nrevision ") || !strings.HasSuffix(out, "\n") {
			t.Errorf("%s: exit %d, stdout %q, stderr %q", arg, code, out, errs)
		}
	}
}

// TestHelp: --help on every command prints the command's own flags on stdout and
// exits 0; a bad flag exits 2 with the usage on stderr.
func TestHelp(t *testing.T) {
	for _, c := range []struct {
		cmd          string
		want, reject []string
	}{
		{"run", []string{"-http", "-socket", "-nats-url"}, nil},
		{"serve", []string{"-http", "-nats-url", "persistence|"}, nil},
		{"setup", []string{"-nats-url", "-print-permissions", "-replicas"}, []string{"-socket", "-http", "-policy", "-idle-timeout"}},
		{"query", []string{"-src", "-e"}, []string{"-nats-url"}},
		{"events", []string{"-vm", "-since"}, nil},
		{"audit", []string{"-since", "-json"}, []string{"-vm"}},
		{"bench", []string{"-clients"}, nil},
		{"lab", []string{"-hosts", "-http"}, nil},
	} {
		for _, h := range []string{"--help", "-h"} {
			code, out, errs := runDispatch(context.Background(), c.cmd, h)
			if code != 0 || errs != "" || !strings.HasPrefix(out, "usage: qubesbus "+c.cmd) || !strings.HasSuffix(out, "\n") {
				t.Errorf("%s %s: exit %d, stdout %q, stderr %q", c.cmd, h, code, out, errs)
				continue
			}
			for _, w := range c.want {
				if !strings.Contains(out, w) {
					t.Errorf("%s %s lacks %s:\n%s", c.cmd, h, w, out)
				}
			}
			for _, r := range c.reject {
				if strings.Contains(out, r+" ") || strings.Contains(out, r+"\n") {
					t.Errorf("%s %s lists %s:\n%s", c.cmd, h, r, out)
				}
			}
		}
		code, out, errs := runDispatch(context.Background(), c.cmd, "--no-such-flag")
		if c.cmd == "serve" {
			code, out, errs = runDispatch(context.Background(), c.cmd, "gateway", "--no-such-flag")
		}
		if code != 2 || out != "" || !strings.Contains(errs, "no-such-flag") || !strings.Contains(errs, "usage: qubesbus "+c.cmd) {
			t.Errorf("%s --no-such-flag: exit %d, stdout %q, stderr %q", c.cmd, code, out, errs)
		}
	}
	if code, out, _ := runDispatch(context.Background(), "--help"); code != 0 || !strings.Contains(out, "version") {
		t.Errorf("--help: exit %d, %q", code, out)
	}
}

// TestLogFormatJSON: --log-format json makes every log line a JSON object.
func TestLogFormatJSON(t *testing.T) {
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // start-up stops at once and says so in the log
	code, _, errs := runDispatch(ctx, "--log-format", "json", "run", "--data-dir", filepath.Join(dir, "data"),
		"--socket", filepath.Join(dir, "s.sock"), "--qubes-xml", "../../testdata/qubes.xml")
	lines := strings.Split(strings.TrimSuffix(errs, "\n"), "\n")
	if code != 0 || len(lines) == 0 || lines[0] == "" {
		t.Fatalf("exit %d, stderr %q", code, errs)
	}
	for _, l := range lines {
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil || m["msg"] == nil || m["level"] == nil {
			t.Errorf("not a JSON log line: %q (%v)", l, err)
		}
	}
	if code, _, errs := runDispatch(context.Background(), "--log-format", "xml", "version"); code != 2 || !strings.Contains(errs, "xml") {
		t.Errorf("--log-format xml: exit %d, %q", code, errs)
	}
}

// answerOnce serves one call on a Unix socket with a fixed response.
func answerOnce(t *testing.T, resp string) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "s.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		_, _ = io.ReadAll(c)
		_, _ = c.Write([]byte(resp))
	}()
	return sock
}

// TestQueryOutput: a result ends with a newline; a refusal without a message says
// what was refused.
func TestQueryOutput(t *testing.T) {
	sock := answerOnce(t, "0\x00default=False type=label red")
	code, out, errs := runDispatch(context.Background(), "query", "--socket", sock, "-e", "admin.vm.property.Get", "work", "label")
	if code != 0 || out != "default=False type=label red\n" || errs != "" {
		t.Errorf("result: exit %d, stdout %q, stderr %q", code, out, errs)
	}
	sock = answerOnce(t, "2\x00PermissionDenied\x00\x00\x00")
	code, out, errs = runDispatch(context.Background(), "query", "--socket", sock, "--src", "work", "-e", "admin.vm.Kill", "dom0")
	if code != 1 || out != "" || errs != "PermissionDenied: admin.vm.Kill refused (source work, destination dom0)\n" {
		t.Errorf("refusal: exit %d, stdout %q, stderr %q", code, out, errs)
	}
	sock = answerOnce(t, "2\x00QubesVMNotFoundError\x00\x00No such domain: 'x'\x00")
	if code, _, errs := runDispatch(context.Background(), "query", "--socket", sock, "-e", "admin.vm.List", "x"); code != 1 ||
		errs != "QubesVMNotFoundError: No such domain: 'x'\n" {
		t.Errorf("exception: exit %d, stderr %q", code, errs)
	}
}

// A 60 KiB name in a log record's message, a string value or an error is clipped to
// its start and its length, in both formats; short values and other kinds stay whole.
func TestLogClipsLongValues(t *testing.T) {
	long := "x" + strings.Repeat("é", 30*1024) // byte 256 is inside a two-byte character
	for _, format := range []string{"text", "json"} {
		var b bytes.Buffer
		log, err := newLogger(format, &b, slog.LevelInfo)
		if err != nil {
			t.Fatal(err)
		}
		log.Warn("bad request "+long, "name", long, "err", errors.New("no such domain: "+long), "short", "work", "n", 7)
		line := b.String()
		if len(line) > 2048 {
			t.Fatalf("%s: a %d-byte line for a %d-byte name", format, len(line), len(long))
		}
		if got := strings.Count(line, fmt.Sprintf("… (%d bytes)", len(long))); got != 1 {
			t.Errorf("%s: the name's length noted %d times, want once (the value): %s", format, got, line)
		}
		for _, want := range []string{fmt.Sprintf("(%d bytes)", len("bad request ")+len(long)), fmt.Sprintf("(%d bytes)", len("no such domain: ")+len(long)), "work", "7"} {
			if !strings.Contains(line, want) {
				t.Errorf("%s: %q missing from %s", format, want, line)
			}
		}
	}
	// The handlers escape a broken character, so look at the clipped value itself.
	if v := clipLongValues(nil, slog.String("name", long)).Value.String(); !utf8.ValidString(v) {
		t.Errorf("clipped inside a character: %q", v[:260])
	}
}
