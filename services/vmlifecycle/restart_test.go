package vmlifecycle_test

import (
	"context"
	"encoding/json"
	"fmt"
	"regexp"
	"testing"
	"time"

	"github.com/qubesbus/qubesbus/schemas/lifecycle"

	"github.com/nats-io/nats.go"

	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/bus/cloudevent"
	"github.com/qubesbus/qubesbus/schemas/config"
	"github.com/qubesbus/qubesbus/services/vmlifecycle"
	"github.com/qubesbus/qubesbus/services/vmlifecycle/simdriver"
)

func TestPowerStateSurvivesRestart(t *testing.T) {
	x := newHost(t, simdriver.Config{ShutdownLatency: 200 * time.Millisecond})
	x.call("admin.vm.Start", "work", "")
	x.call("admin.vm.Pause", "work", "")
	// A graceful shutdown begun by one instance completes under the next.
	mark := x.events.mark()
	x.call("admin.vm.Start", "personal", "")
	x.call("admin.vm.Shutdown", "personal", "")
	x.stopService()
	x.startService()

	states := lifecycle.Client{NC: x.nc, Host: x.h}
	ctx := context.Background()
	bustest.CheckFor(t, 5*time.Second, 10*time.Millisecond, func() error {
		got, err := states.PowerStates(ctx)
		if err != nil {
			return err
		}
		want := map[string]string{"dom0": "Running", "sys-net": "Running", "sys-firewall": "Running", "work": "Paused"}
		if len(got) != len(want) {
			return fmt.Errorf("states %v, want %v", got, want)
		}
		for k, v := range want {
			if got[k] != v {
				return fmt.Errorf("states %v, want %v", got, want)
			}
		}
		return nil
	})
	x.events.expect(t, mark, seq(
		"personal domain-pre-start start_guid=True mem_required=None", "personal domain-verify-files",
		startSeq("personal")[2:], "personal domain-pre-shutdown force=False", stopSeq("personal")))
	// The new instance knows the domains: the veto and the stop still work.
	if r := x.call("admin.vm.Shutdown", "sys-firewall", ""); r != exc("QubesVMInUseError", "There are other VMs connected to this VM: work") {
		t.Errorf("veto after restart: %v", r)
	}
	x.callEvents("admin.vm.Kill", "work", "", ok(""), stopSeq("work"))
}

func TestRuntimeValues(t *testing.T) {
	x := newHost(t, simdriver.Config{})
	x.call("admin.vm.Start", "work", "")
	client := lifecycle.Client{NC: x.nc, Host: x.h}
	rts, err := client.Runtimes(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	startTime := regexp.MustCompile(`^[0-9]{10}\.[0-9]{1,2}$`)
	for name, xid := range map[string]int{"sys-net": 1, "sys-firewall": 2, "work": 3} {
		rt := rts[name]
		if rt.PowerState != vmlifecycle.Running || rt.XID != xid || rt.StubdomXID != -1 || !startTime.MatchString(rt.StartTime) {
			t.Errorf("%s: %+v", name, rt)
		}
	}
	if rt := rts["dom0"]; rt.XID != 0 || rt.PowerState != vmlifecycle.Running {
		t.Errorf("dom0: %+v", rt)
	}
	if _, ok := rts["personal"]; ok {
		t.Errorf("a halted qube is listed: %+v", rts["personal"])
	}
	snap, err := client.RuntimeSnapshot(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if v := snap.Values["work"]; v.State != "Running" || v.XID != 3 || v.StubdomXID != -1 || v.StartTime != rts["work"].StartTime {
		t.Errorf("RuntimeSnapshot work: %+v", v)
	}
}

func TestStatsStream(t *testing.T) {
	x := newHost(t, simdriver.Config{})
	x.apply(config.Op{Kind: config.OpSetGlobalProperty, Name: "stats_interval", Value: "1"})
	x.call("admin.vm.Start", "sys-net", "")

	samples := make(chan *nats.Msg, 64)
	sub, err := x.nc.ChanSubscribe(x.h.Service(lifecycle.ServiceToken, lifecycle.SubjectStats), samples)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := x.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	r := x.call("admin.vm.Stats", "dom0", "")
	if r.Status != "ok" {
		t.Fatal(r)
	}
	var stream vmlifecycle.StatsStream
	if err := json.Unmarshal([]byte(r.Content), &stream); err != nil {
		t.Fatal(err)
	}
	if stream.Subject != sub.Subject || stream.IntervalMS != 1000 || stream.Lease == "" {
		t.Fatalf("stream %+v", stream)
	}
	// The first sample comes at once: dom0 and sys-net, in xid order.
	got := map[string]cloudevent.Event{}
	for len(got) < 2 {
		select {
		case m := <-samples:
			ev, _, err := cloudevent.Decode(context.Background(), m)
			if err != nil {
				t.Fatal(err)
			}
			got[ev.VM] = ev
		case <-time.After(5 * time.Second):
			t.Fatalf("samples: %v", got)
		}
	}
	ev := got["sys-net"]
	keys := []string{"memory_kb", "memory_assigned_total", "memory_assigned_usable", "memory_with_swap_used", "cpu_time", "cpu_usage", "online_vcpus"}
	if ev.Name != "vm-stats" || len(ev.Kwargs) != len(keys) {
		t.Fatalf("sample %+v", ev)
	}
	for i, k := range keys {
		if ev.Kwargs[i].Key != k {
			t.Errorf("kwarg %d is %s, want %s", i, ev.Kwargs[i].Key, k)
		}
	}
	if v, _ := ev.Get("memory_kb"); v != "409600" {
		t.Errorf("memory_kb %s", v)
	}
	// Stopping the lease ends the production.
	stop, _ := json.Marshal(vmlifecycle.StatsLeaseRequest{Lease: stream.Lease, Stop: true})
	if _, err := x.nc.Request(stream.LeaseSubject, stop, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if n := x.svc.Watchers(); n != 0 {
		t.Errorf("%d watchers after stop", n)
	}
	// Stats events never enter the event stream.
	for _, l := range x.events.since(0) {
		if regexp.MustCompile(`vm-stats`).MatchString(l) {
			t.Fatalf("vm-stats in QUBES_EVENTS: %s", l)
		}
	}
}
