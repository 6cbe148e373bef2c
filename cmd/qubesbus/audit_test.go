package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/qubesbus/qubesbus/bus/audit"
	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/system"
)

type jsonRecord struct {
	Seq uint64 `json:"seq"`
	audit.Record
}

// TestAuditTail: `qubesbus audit` prints the records of the calls, as lines or JSON
// objects, resumes with --since, and reads the auditor role's key from the data dir.
func TestAuditTail(t *testing.T) {
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	sys, err := system.Start(ctx, system.Config{
		Socket: filepath.Join(dir, "s.sock"), DataDir: filepath.Join(dir, "data"),
		QubesXML: "../../testdata/qubes.xml", HostID: "lab1", NATSPort: -1,
	}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer sys.Stop()
	for _, c := range []struct{ header, payload, want string }{
		{"admin.vm.feature.Set+audit dom0 name work", "on", "0\x00"},
		{"admin.vm.feature.Get+audit dom0 name work", "", "0\x00on"}, // a read: not recorded
		{"admin.vm.Start+ dom0 name work", "", "0\x00"},
		{"admin.vm.Kill+ sys-net name work", "", "2\x00PermissionDenied\x00\x00\x00"},
		{"admin.vm.tag.Set+bad\x1b[31m dom0 name work", "", "2\x00"}, // an escape in the argument
	} {
		if resp, err := call(ctx, sys.Socket, c.header, []byte(c.payload)); err != nil || !strings.HasPrefix(string(resp), c.want) {
			t.Fatalf("%q: %q %v, want %q…", c.header, resp, err, c.want)
		}
	}

	// The command as typed, with the default key (data dir) and human-readable lines.
	var out, errOut bytes.Buffer
	tctx, tcancel := context.WithTimeout(ctx, 30*time.Second)
	defer tcancel()
	code := dispatch(tctx, []string{"audit", "--nats-url", sys.NATSURL, "--data-dir", filepath.Join(dir, "data"),
		"--host", "lab1", "--since", "1", "-n", "4"}, nil, &out, &errOut)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut.String())
	}
	text := out.String()
	t.Logf("qubesbus audit:\n%s", text)
	if !strings.HasSuffix(text, "\n") {
		t.Fatalf("output does not end with a newline: %q", text)
	}
	lines := strings.Split(strings.TrimSuffix(text, "\n"), "\n")
	ts := `\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z`
	want := []string{
		`^1 ` + ts + ` lab1 dom0 → admin\.vm\.feature\.Set work audit ok payload=2 id=\w+$`,
		`^2 ` + ts + ` lab1 dom0 → admin\.vm\.Start work - ok id=\w+$`,
		`^3 ` + ts + ` lab1 sys-net → admin\.vm\.Kill work - exception PermissionDenied id=\w+$`,
		`^4 ` + ts + ` lab1 dom0 → admin\.vm\.tag\.Set work "bad\\x1b\[31m" exception \w+ id=\w+$`,
	}
	if len(lines) != len(want) {
		t.Fatalf("%d lines, want %d:\n%s", len(lines), len(want), text)
	}
	for i, w := range want {
		if !regexp.MustCompile(w).MatchString(lines[i]) {
			t.Errorf("line %d: %q\ndoes not match %s", i+1, lines[i], w)
		}
	}

	// JSON, resuming after the second record, on every host.
	tailJSON := func(o auditOptions) []jsonRecord {
		t.Helper()
		var buf bytes.Buffer
		o.NATSURL, o.DataDir, o.JSON = sys.NATSURL, filepath.Join(dir, "data"), true
		if err := tailAudit(tctx, o, &buf, slog.New(slog.DiscardHandler)); err != nil {
			t.Fatalf("tail %+v: %v", o, err)
		}
		var recs []jsonRecord
		sc := bufio.NewScanner(&buf)
		for sc.Scan() {
			var r jsonRecord
			if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
				t.Fatalf("%q: %v", sc.Bytes(), err)
			}
			recs = append(recs, r)
		}
		return recs
	}
	recs := tailJSON(auditOptions{Host: "*", Since: "3", Limit: 2})
	if len(recs) != 2 || recs[0].Seq != 3 || recs[0].Source != "sys-net" || recs[0].Method != "admin.vm.Kill" ||
		recs[0].Outcome != audit.OutcomeException || recs[0].Exception != "PermissionDenied" || recs[0].Host != "lab1" ||
		recs[1].Seq != 4 || recs[1].Arg != "bad\x1b[31m" {
		t.Fatalf("--json --since 3: %+v", recs)
	}
	// A duration ago reaches back to the first record.
	if recs := tailJSON(auditOptions{Host: "lab1", Since: "10m", Limit: 1}); len(recs) != 1 || recs[0].Seq != 1 ||
		recs[0].Method != "admin.vm.feature.Set" || recs[0].PayloadLen != 2 {
		t.Fatalf("--since 10m: %+v", recs)
	}
	if code := dispatch(ctx, []string{"audit", "--since", "yesterday"}, nil, &out, &errOut); code != 1 ||
		!strings.Contains(errOut.String(), "--since") {
		t.Fatalf("bad --since: exit %d, %s", code, errOut.String())
	}
}
