package system

import (
	"bytes"
	"fmt"
	"strings"
	"testing"
	"time"
)

// brief renders a frame or reply for a failure message: long runs of one byte are
// counted, not printed.
func brief(b []byte) string {
	var out strings.Builder
	for i := 0; i < len(b); {
		j := i
		for j < len(b) && b[j] == b[i] {
			j++
		}
		if j-i > 8 {
			fmt.Fprintf(&out, "%q×%d", b[i:i+1], j-i)
		} else {
			fmt.Fprintf(&out, "%q", b[i:j])
		}
		i = j
	}
	return out.String()
}

// No name a client sends can stop the daemon: a tag or feature name of 60 KiB (the
// request limit is 64 KiB) gets qubesd's answer, its events reach admin.Events
// subscribers with the exact name, and the daemon serves on (the reported bug: the
// event subject carried the name, NATS closed the service's connection for an
// over-long protocol line, and every later call got an empty answer).
func TestLongNamesNeverStopTheDaemon(t *testing.T) {
	sys := startSystem(t)
	all := openEvents(t, sys.Socket, "dom0")
	personal := openEvents(t, sys.Socket, "personal")
	const size = 60 << 10
	tag := strings.Repeat("t", size-1) + "1"
	feat := strings.Repeat("ab.", size/3) + "c"
	weird := "x\r\ny\x01" + strings.Repeat("\t", size-4) // any ASCII but space and NUL

	calls := []struct {
		req    string
		want   string
		frames []string // on the dom0 stream
	}{
		// Tags: [A-Za-z0-9_-]+ of any length (qubesd sets no limit).
		{"admin.vm.tag.Set+" + tag + " dom0 name personal\x00", "0\x00",
			[]string{"1\x00personal\x00domain-tag-add:" + tag + "\x00tag\x00" + tag + "\x00\x00"}},
		{"admin.vm.tag.Get+" + tag + " dom0 name personal\x00", "0\x001", nil},
		{"admin.vm.tag.Set+" + tag + ". dom0 name personal\x00", "2\x00QubesInvalidTagError\x00\x00disallowed characters\x00", nil},
		// Feature names: [a-zA-Z0-9_.-]+ of any length.
		{"admin.vm.feature.Set+" + feat + " dom0 name work\x00" + "1", "0\x00",
			[]string{"1\x00work\x00domain-feature-pre-set:" + feat + "\x00feature\x00" + feat + "\x00value\x001\x00\x00",
				"1\x00work\x00domain-feature-set:" + feat + "\x00feature\x00" + feat + "\x00value\x001\x00\x00"}},
		{"admin.vm.feature.Get+" + feat + " dom0 name work\x00", "0\x001", nil},
		{"admin.vm.feature.Set+" + feat + "/ dom0 name work\x00" + "1", "2\x00ProtocolError\x00\x00feature name contains illegal characters\x00", nil},
		// feature.Remove announces a name it does not validate, whatever its bytes.
		{"admin.vm.feature.Remove+" + weird + " dom0 name work\x00",
			"2\x00QubesFeatureNotFoundError\x00\x00Feature not set for domain work: " + weird + "\x00",
			[]string{"1\x00work\x00domain-feature-pre-delete:" + weird + "\x00feature\x00" + weird + "\x00\x00"}},
		{"admin.vm.tag.Remove+" + tag + " dom0 name personal\x00", "0\x00",
			[]string{"1\x00personal\x00domain-tag-delete:" + tag + "\x00tag\x00" + tag + "\x00\x00"}},
	}
	for _, c := range calls {
		if len(c.req) > 64<<10 {
			t.Fatalf("request of %d bytes is over the gateway's limit", len(c.req))
		}
		if got := roundTrip(t, sys.Socket, []byte(c.req)); string(got) != c.want {
			t.Fatalf("%s: got %s, want %s", brief([]byte(c.req[:40])), brief(got), brief([]byte(c.want)))
		}
		for _, w := range c.frames {
			got, err := all.next(10 * time.Second)
			if err != nil || string(got) != w {
				t.Fatalf("%s: dom0 stream frame %s %v, want %s", brief([]byte(c.req[:40])), brief(got), err, brief([]byte(w)))
			}
			if strings.HasPrefix(w, "1\x00personal\x00") {
				if got, err := personal.next(10 * time.Second); err != nil || string(got) != w {
					t.Fatalf("personal stream frame %s %v, want %s", brief(got), err, brief([]byte(w)))
				}
			}
		}
	}
	// Should a service's connection send an over-long subject anyway, it loses that
	// message, not its connection (nats.go would not reconnect after the server's
	// "maximum control line exceeded").
	if len(sys.conns) < len(Services) {
		t.Fatalf("%d connections, want one per service", len(sys.conns))
	}
	for _, nc := range sys.conns {
		if err := nc.Publish("qubes.v1.test.events.work."+strings.Repeat("x", size), []byte("{}")); err != nil {
			t.Fatalf("%s: %v", nc.Opts.Name, err)
		}
		if err := nc.FlushTimeout(5 * time.Second); err != nil {
			t.Fatalf("%s: %v", nc.Opts.Name, err)
		}
	}
	for _, nc := range sys.conns {
		if !nc.IsConnected() || nc.LastError() != nil {
			t.Fatalf("%s: connected %v, last error %v", nc.Opts.Name, nc.IsConnected(), nc.LastError())
		}
	}
	// The daemon still serves, reads and changes alike.
	if got := roundTrip(t, sys.Socket, []byte(listAll)); !bytes.HasPrefix(got, []byte("0\x00dom0 class=AdminVM")) {
		t.Fatalf("admin.vm.List after long names: %s", brief(got))
	}
	if got := roundTrip(t, sys.Socket, []byte("admin.vm.tag.Set+after dom0 name personal\x00")); string(got) != "0\x00" {
		t.Fatalf("tag.Set after long names: %s", brief(got))
	}
	want := "1\x00personal\x00domain-tag-add:after\x00tag\x00after\x00\x00"
	if got, err := all.next(10 * time.Second); err != nil || string(got) != want {
		t.Fatalf("event after long names: %s %v", brief(got), err)
	}
}
