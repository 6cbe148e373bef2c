package system

import (
	"context"
	"fmt"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/access"

	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/services/vmlifecycle/simdriver"
)

var listState = regexp.MustCompile(`(?m)^work class=AppVM state=(\w+) `)

// powerOf reads work's power state and xid as qvm-ls does (List, then GetAll).
func powerOf(t *testing.T, socket string) (state, xid string) {
	t.Helper()
	list := roundTrip(t, socket, []byte("admin.vm.List+ dom0 name dom0\x00"))
	m := listState.FindSubmatch(list)
	if m == nil {
		t.Fatalf("work missing from the list: %q", list)
	}
	all := string(roundTrip(t, socket, []byte("admin.vm.property.GetAll+ dom0 name work\x00")))
	for _, line := range strings.Split(all, "\n") {
		if v, ok := strings.CutPrefix(line, "xid default="); ok {
			xid = v[strings.LastIndexByte(v, ' ')+1:]
		}
	}
	return string(m[1]), xid
}

// The properties service caches runtime values between change notices. A read after a
// Start's or a Kill's reply must show its effect at once (the reply's runtime mark
// travels with the next request), and a qube that stops by itself must show Halted
// once its notice arrives. The cache's maximum age is an hour here, so only the marks
// and the notices can make these pass.
func TestRuntimeCacheNeverServesStaleState(t *testing.T) {
	sys := startSystem(t, func(c *Config) { c.RuntimeMaxAge = time.Hour })
	lab := simdriver.LabClient{NC: connectAs(t, sys, access.Lab), Host: subject.ForHost("test")}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	zero := int64(0)
	if _, err := lab.Configure(ctx, simdriver.LabConfig{BootLatencyMS: &zero, ShutdownLatencyMS: &zero}); err != nil {
		t.Fatal(err)
	}
	ok := []byte("0\x00")
	for i := 0; i < 20; i++ {
		if st, _ := powerOf(t, sys.Socket); st != "Halted" { // warms the cache
			t.Fatalf("round %d: work is %s before the start", i, st)
		}
		if got := roundTrip(t, sys.Socket, []byte("admin.vm.Start+ dom0 name work\x00")); string(got) != string(ok) {
			t.Fatalf("round %d: start: %q", i, got)
		}
		if st, xid := powerOf(t, sys.Socket); st != "Running" || xid == "-1" || xid == "" {
			t.Fatalf("round %d: right after the start work is %s with xid %q", i, st, xid)
		}
		if got := roundTrip(t, sys.Socket, []byte("admin.vm.Kill+ dom0 name work\x00")); string(got) != string(ok) {
			t.Fatalf("round %d: kill: %q", i, got)
		}
		if st, xid := powerOf(t, sys.Socket); st != "Halted" || xid != "-1" {
			t.Fatalf("round %d: right after the kill work is %s with xid %q", i, st, xid)
		}
	}

	// Stopped behind qubesbus's back: only the hypervisor notice tells.
	if got := roundTrip(t, sys.Socket, []byte("admin.vm.Start+ dom0 name work\x00")); string(got) != string(ok) {
		t.Fatalf("start: %q", got)
	}
	if st, _ := powerOf(t, sys.Socket); st != "Running" {
		t.Fatalf("work is %s after the start", st)
	}
	if err := lab.PowerOff(ctx, "work"); err != nil {
		t.Fatal(err)
	}
	bustest.CheckFor(t, 30*time.Second, 10*time.Millisecond, func() error {
		if st, xid := powerOf(t, sys.Socket); st != "Halted" || xid != "-1" {
			return fmt.Errorf("work is %s with xid %s after it powered off", st, xid)
		}
		return nil
	})
}
