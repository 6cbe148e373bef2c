package system

import (
	"context"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/bus/cloudevent/recorder"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/services/vmlifecycle/hvbus"
	"github.com/qubesbus/qubesbus/services/vmlifecycle/simdriver"
)

// Two lifecycle instances share the hypervisor service: one serves, the other stands
// by. When the serving one goes, the other takes over the running domains, and a stop
// the hypervisor reported while nobody served is still announced.
func TestLifecycleStandbyTakesOver(t *testing.T) {
	ns := bustest.RunJetStream(t)
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cfg := Config{Socket: filepath.Join(dir, "qubesd.sock"), DataDir: filepath.Join(dir, "data"),
		QubesXML: filepath.Join(repoTestdata, "qubes.xml"), HostID: "test", NATSURL: ns.ClientURL(), LeaseTTL: time.Second}
	log := slog.New(slog.DiscardHandler)
	start := func(name string) func() error {
		t.Helper()
		one, err := StartService(ctx, name, cfg, log)
		if err != nil {
			t.Fatalf("start %s: %v", name, err)
		}
		t.Cleanup(func() { _ = one.Stop() })
		return one.Stop
	}
	start("persistence")
	start("hypervisor")
	stopA := start("vmlifecycle")
	start("storage") // a start prepares the qube's volumes
	start("devices")
	start("properties")
	start("gateway")
	nc := bustest.Connect(t, ns)
	js, _ := jetstream.New(nc)
	events := recorder.Record(t, js, subject.ForHost("test").Events())
	lab := simdriver.LabClient{NC: nc, Host: subject.ForHost("test")}

	// call waits for an answer ending in want (during a takeover the call may fail).
	call := func(req, want string) {
		t.Helper()
		bustest.CheckFor(t, 30*time.Second, 50*time.Millisecond, func() error {
			if got := string(roundTrip(t, cfg.Socket, []byte(req))); !strings.HasPrefix(got, "0\x00") || !strings.HasSuffix(got, want) {
				return fmt.Errorf("%q answered %q, want one ending in %q", req, got, want)
			}
			return nil
		})
	}
	// Instance A holds the lease once a power call works.
	call("admin.vm.Start+ dom0 name work\x00", "0\x00")
	call("admin.vm.Start+ dom0 name personal\x00", "0\x00")
	// A stops while nobody stands by; personal powers off meanwhile.
	mark := events.Mark(t)
	if err := stopA(); err != nil {
		t.Fatal(err)
	}
	if err := lab.PowerOff(ctx, "personal"); err != nil {
		t.Fatal(err)
	}
	bustest.CheckFor(t, 30*time.Second, 50*time.Millisecond, func() error {
		info, err := js.Stream(ctx, hvbus.NoticeStream)
		if err != nil || info.CachedInfo().State.Msgs == 0 {
			return fmt.Errorf("the power-off notice is not stored yet (%v)", err)
		}
		return nil
	})
	// B takes over: the domain A started runs on, the stop nobody saw is announced.
	stopB := start("vmlifecycle")
	call("admin.vm.CurrentState+ dom0 name work\x00", "power_state=Running")
	bustest.CheckFor(t, 30*time.Second, 50*time.Millisecond, func() error {
		for _, r := range events.Since(mark) {
			if r.Event.VM == "personal" && r.Event.Name == "domain-shutdown" {
				return nil
			}
		}
		return fmt.Errorf("no domain-shutdown of personal after the takeover")
	})

	// C stands by while B serves, and takes over when B goes.
	start("vmlifecycle")
	if err := stopB(); err != nil {
		t.Fatal(err)
	}
	call("admin.vm.Kill+ dom0 name work\x00", "0\x00")
	call("admin.vm.CurrentState+ dom0 name work\x00", "power_state=Halted")
}
