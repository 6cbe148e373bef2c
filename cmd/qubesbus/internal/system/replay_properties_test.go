package system

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// lifecycleMethods are served by vmlifecycle; the properties replays skip their calls.
var lifecycleMethods = map[string]bool{
	"admin.vm.Start": true, "admin.vm.Shutdown": true, "admin.vm.Kill": true,
	"admin.vm.Pause": true, "admin.vm.Unpause": true, "admin.vm.Suspend": true,
	"admin.vm.Resume": true, "admin.vm.CurrentState": true, "admin.vm.Console": true,
	"admin.vm.Stats": true,
}

// requestMethod is the method name of a raw request ("" if it has no header).
func requestMethod(req []byte) string {
	head, _, ok := bytes.Cut(req, []byte{0})
	if !ok {
		return ""
	}
	first, _, _ := bytes.Cut(head, []byte(" "))
	m, _, _ := bytes.Cut(first, []byte("+"))
	return string(m)
}

var vmListLine = regexp.MustCompile(`(?m)^(\S+) (class=\S+ state=\S+) uuid=\S+$`)

// normalise masks what may differ from a recording: the uuid of qubes created during
// the run, and the Python object repr in QubesPropertyValueError messages.
func normalise(resp []byte, created []string) []byte {
	out := vmListLine.ReplaceAllFunc(resp, func(line []byte) []byte {
		m := vmListLine.FindSubmatch(line)
		if slices.Contains(created, string(m[1])) {
			return []byte(string(m[1]) + " " + string(m[2]) + " uuid=‹created›")
		}
		return line
	})
	if bytes.HasPrefix(out, []byte("2\x00QubesPropertyValueError\x00")) {
		if i := bytes.Index(out, []byte(" at 0x")); i >= 0 {
			if j := bytes.LastIndexByte(out[:i], '<'); j >= 0 {
				out = append(out[:j:j], []byte("<‹repr›\x00")...)
			}
		}
	}
	return out
}

var createName = regexp.MustCompile(`(?:^|\s)name=(\S+)`)

// replay sends every exchange to the system in order and compares the responses.
func replay(t *testing.T, sys *System, file string, exchanges []exchange, created *[]string) (compared int) {
	t.Helper()
	for i, e := range exchanges {
		method := requestMethod(e.Request)
		if lifecycleMethods[method] {
			continue
		}
		compared++
		if strings.HasPrefix(method, "admin.vm.Create") {
			if _, payload, ok := bytes.Cut(e.Request, []byte{0}); ok {
				if m := createName.FindSubmatch(payload); m != nil && bytes.HasPrefix(e.Response, []byte("0\x00")) {
					*created = append(*created, string(m[1]))
				}
			}
		}
		got := roundTrip(t, sys.Socket, e.Request)
		if g, w := normalise(got, *created), normalise(e.Response, *created); !bytes.Equal(g, w) {
			name := file
			if e.Case != "" {
				name = e.Case
			}
			t.Errorf("%s #%d %s\nrequest %q\n    got %q\n   want %q", name, i, method, e.Request, g, w)
		}
	}
	return compared
}

// TestReplayPropertiesTranscripts replays the tool runs 01 to 26 in order against one
// system started from the fixture, as they were recorded against one qubesd.
func TestReplayPropertiesTranscripts(t *testing.T) {
	sys := startSystem(t)
	files, err := filepath.Glob(filepath.Join(repoTestdata, "transcripts", "[0-2][0-9]-*.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	var created []string
	n, compared := 0, 0
	for _, f := range files {
		base := filepath.Base(f)
		var num int
		if _, err := fmt.Sscanf(base, "%02d-", &num); err != nil || num < 1 || num > 26 {
			continue
		}
		n++
		compared += replay(t, sys, base, loadTranscript(t, base), &created)
	}
	t.Logf("%d transcripts, %d responses compared", n, compared)
	if n != 26 {
		t.Fatalf("replayed %d transcripts, want 26", n)
	}
}

// rawErrorsSkipped are raw-errors cases this replay does not cover: lifecycle calls
// (by method, above) and a case recorded without a qrexec policy.
var rawErrorsSkipped = map[string]bool{"err-nonadmin-src-list-no-policy": true}

// TestReplayRawErrorsProperties replays the raw single requests of raw-errors.jsonl
// (property, feature, tag, label, create and remove cases among them) in their
// recorded order against a fresh system.
func TestReplayRawErrorsProperties(t *testing.T) {
	if _, err := os.Stat(filepath.Join(repoTestdata, "transcripts", "raw-errors.jsonl")); err != nil {
		t.Fatal(err)
	}
	sys := startSystem(t)
	var todo []exchange
	for _, e := range loadTranscript(t, "raw-errors.jsonl") {
		if !rawErrorsSkipped[e.Case] && !lifecycleMethods[requestMethod(e.Request)] {
			todo = append(todo, e)
		}
	}
	var created []string
	t.Logf("%d responses compared", replay(t, sys, "raw-errors.jsonl", todo, &created))
}
