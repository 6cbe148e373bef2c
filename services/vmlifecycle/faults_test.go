package vmlifecycle_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/qubesbus/qubesbus/schemas/config"
	"github.com/qubesbus/qubesbus/services/vmlifecycle/simdriver"
)

// Qubes of the fixture: work → sys-firewall → sys-net (netvm chain); sys-net and
// sys-firewall are domain-3 and domain-4, personal domain-6, work domain-5.

func TestStartBringsUpNetVMChain(t *testing.T) {
	x := newHost(t, simdriver.Config{})
	// Transcript 30: the qube's pre-start first, then its netvm's whole start, then
	// its netvm's netvm's, innermost first.
	x.callEvents("admin.vm.Start", "work", "", ok(""), seq(
		"work domain-pre-start start_guid=True mem_required=None", "work domain-verify-files",
		"sys-firewall domain-pre-start start_guid=True mem_required=None", "sys-firewall domain-verify-files",
		startSeq("sys-net"),
		startSeq("sys-firewall")[2:],
		startSeq("work")[2:],
	))
	for _, q := range []string{"sys-net", "sys-firewall", "work"} {
		x.waitState(q, "Running")
	}
	rts, err := x.svc.Runtimes(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if rts["sys-net"].XID != 1 || rts["sys-firewall"].XID != 2 || rts["work"].XID != 3 || rts["work"].StubdomXID != -1 {
		t.Errorf("xids: %+v", rts)
	}
	if got := x.call("admin.vm.CurrentState", "work", ""); got.Status != "ok" || !strings.HasPrefix(got.Content, "mem=409600 mem_static_max=4096000 cputime=") {
		t.Errorf("CurrentState: %v", got)
	}
}

func TestShutdownRefusedWhileNetVMInUse(t *testing.T) {
	x := newHost(t, simdriver.Config{ShutdownLatency: 10 * time.Millisecond})
	x.call("admin.vm.Start", "work", "")
	for _, c := range []struct{ vm, users string }{{"sys-firewall", "work"}, {"sys-net", "sys-firewall"}} {
		mark := x.events.mark()
		msg := "There are other VMs connected to this VM: " + c.users
		if r := x.call("admin.vm.Shutdown", c.vm, "wait"); r != exc("QubesVMInUseError", msg) {
			t.Errorf("shutdown %s: %v", c.vm, r)
		}
		x.events.expect(t, mark, seq(c.vm+" domain-pre-shutdown force=False", c.vm+" domain-shutdown-failed reason="+msg))
	}
	// Running personal also uses sys-firewall: both are named, in qubes.xml order.
	x.call("admin.vm.Start", "personal", "")
	if r := x.call("admin.vm.Shutdown", "sys-firewall", ""); r != exc("QubesVMInUseError", "There are other VMs connected to this VM: personal, work") {
		t.Errorf("two users: %v", r)
	}
	// force skips the veto.
	mark := x.events.mark()
	if r := x.call("admin.vm.Shutdown", "sys-firewall", "force+wait"); r != ok("") {
		t.Fatal(r)
	}
	if stored := x.events.mark() - mark; stored != 6 {
		t.Errorf("shutdown with wait replied after %d of its 6 events were stored", stored)
	}
	x.events.expect(t, mark, seq("sys-firewall domain-pre-shutdown force=True", stopSeq("sys-firewall")))
}

func TestStartFailsAndRollsBack(t *testing.T) {
	x := newHost(t, simdriver.Config{})
	ctx := context.Background()
	free := x.hv.FreeMemoryMiB()
	if err := x.lab.SetFaults(ctx, "sys-net", simdriver.LabFaultSpec{StartFails: "libxl: cannot create domain"}); err != nil {
		t.Fatal(err)
	}
	msg := "Start failed: libxl: cannot create domain, see /var/log/libvirt/libxl/libxl-driver.log for details"
	x.callEvents("admin.vm.Start", "work", "", exc("QubesException", msg), seq(
		"work domain-pre-start start_guid=True mem_required=None", "work domain-verify-files",
		"sys-firewall domain-pre-start start_guid=True mem_required=None", "sys-firewall domain-verify-files",
		"sys-net domain-pre-start start_guid=True mem_required=None", "sys-net domain-verify-files",
		"sys-net domain-pre-spawn start_guid=True",
		"sys-net domain-start-failed reason="+msg,
		"sys-firewall domain-start-failed reason="+msg,
		"work domain-start-failed reason="+msg,
	))
	for _, q := range []string{"sys-net", "sys-firewall", "work"} {
		if st := x.state(q); st != "Halted" {
			t.Errorf("%s is %s", q, st)
		}
	}
	if got := x.hv.FreeMemoryMiB(); got != free {
		t.Errorf("free memory %d MiB after the failed start, want %d", got, free)
	}
	// Once the fault is gone the same start succeeds.
	if err := x.lab.SetFaults(ctx, "sys-net", simdriver.LabFaultSpec{}); err != nil {
		t.Fatal(err)
	}
	if r := x.call("admin.vm.Start", "work", ""); r != ok("") {
		t.Fatal(r)
	}
}

func TestNotEnoughMemory(t *testing.T) {
	x := newHost(t, simdriver.Config{MemoryMiB: 1000})
	// The netvms started (400 MiB each) stay up, as in qubesd; the qube itself never
	// reached pre-spawn.
	x.callEvents("admin.vm.Start", "work", "", exc("QubesMemoryError", "Not enough memory to start domain 'work'"), seq(
		"work domain-pre-start start_guid=True mem_required=None", "work domain-verify-files",
		"sys-firewall domain-pre-start start_guid=True mem_required=None", "sys-firewall domain-verify-files",
		startSeq("sys-net"), startSeq("sys-firewall")[2:],
		"work domain-start-failed reason=Not enough memory to start domain 'work'",
	))
	if st := x.state("work"); st != "Halted" {
		t.Errorf("work is %s", st)
	}
	if st := x.state("sys-firewall"); st != "Running" {
		t.Errorf("sys-firewall is %s", st)
	}
}

func TestStartProhibited(t *testing.T) {
	x := newHost(t, simdriver.Config{})
	x.apply(config.Op{Kind: config.OpSetFeature, Domain: "domain-6", Name: "prohibit-start", Value: "under repair"})
	msg := "Qube start is prohibited. Rationale: under repair"
	x.callEvents("admin.vm.Start", "personal", "", exc("QubesException", msg), []string{"personal domain-start-failed reason=" + msg})
}

func TestShutdownWaitTimesOutWhenGuestHangs(t *testing.T) {
	x := newHost(t, simdriver.Config{})
	x.apply(config.Op{Kind: config.OpSetProperty, Domain: "domain-3", Name: "shutdown_timeout", Value: "1"})
	if err := x.lab.SetFaults(context.Background(), "sys-net", simdriver.LabFaultSpec{ShutdownHangs: true}); err != nil {
		t.Fatal(err)
	}
	x.call("admin.vm.Start", "sys-net", "")
	mark := x.events.mark()
	began := time.Now()
	msg := "Domain shutdown timed out: 'sys-net'"
	if r := x.call("admin.vm.Shutdown", "sys-net", "wait"); r != exc("QubesVMShutdownTimeoutError", msg) {
		t.Fatal(r)
	}
	if took := time.Since(began); took < time.Second {
		t.Errorf("gave up after %v, before shutdown_timeout", took)
	}
	x.events.expect(t, mark, seq("sys-net domain-pre-shutdown force=False", "sys-net domain-shutdown-failed reason="+msg))
	if st := x.state("sys-net"); st != "Halting" {
		t.Errorf("sys-net is %s", st)
	}
	// Kill still works.
	x.callEvents("admin.vm.Kill", "sys-net", "", ok(""), stopSeq("sys-net"))
}

func TestKillDuringShutdownWait(t *testing.T) {
	x := newHost(t, simdriver.Config{})
	if err := x.lab.SetFaults(context.Background(), "sys-net", simdriver.LabFaultSpec{ShutdownHangs: true}); err != nil {
		t.Fatal(err)
	}
	x.call("admin.vm.Start", "sys-net", "")
	done := make(chan reply, 1)
	go func() { done <- x.call("admin.vm.Shutdown", "sys-net", "wait") }()
	x.waitState("sys-net", "Halting")
	if r := x.call("admin.vm.Kill", "sys-net", ""); r != ok("") {
		t.Fatal(r)
	}
	if r := <-done; r != ok("") {
		t.Errorf("the waiting shutdown: %v", r)
	}
}

func TestCrashWhileRunning(t *testing.T) {
	x := newHost(t, simdriver.Config{})
	x.call("admin.vm.Start", "sys-net", "")
	mark := x.events.mark()
	if err := x.lab.Crash(context.Background(), "sys-net"); err != nil {
		t.Fatal(err)
	}
	x.events.expect(t, mark, stopSeq("sys-net"))
	x.waitState("sys-net", "Halted")
	// It starts again with a new domain id.
	if r := x.call("admin.vm.Start", "sys-net", ""); r != ok("") {
		t.Fatal(r)
	}
	rts, _ := x.svc.Runtimes(context.Background())
	if rts["sys-net"].XID != 2 {
		t.Errorf("xid after restart: %d", rts["sys-net"].XID)
	}
}

func TestCrashAtAGivenTime(t *testing.T) {
	x := newHost(t, simdriver.Config{})
	if err := x.lab.SetFaults(context.Background(), "sys-net", simdriver.LabFaultSpec{CrashAfterMS: 150}); err != nil {
		t.Fatal(err)
	}
	x.callEvents("admin.vm.Start", "sys-net", "", ok(""), seq(startSeq("sys-net"), stopSeq("sys-net")))
}

func TestCrashDuringStart(t *testing.T) {
	// The guest boots for 2 s and crashes after 100 ms: the start, waiting for the
	// qrexec agent, fails as qubesd's does, and the stop follows start-failed.
	x := newHost(t, simdriver.Config{BootLatency: 2 * time.Second})
	if err := x.lab.SetFaults(context.Background(), "sys-net", simdriver.LabFaultSpec{CrashAfterMS: 100}); err != nil {
		t.Fatal(err)
	}
	msg := "Cannot connect to qrexec agent for 60 seconds, see /var/log/xen/console/guest-sys-net.log for details"
	x.callEvents("admin.vm.Start", "sys-net", "", exc("QubesVMError", msg),
		seq(startSeq("sys-net")[:10], "sys-net domain-start-failed reason="+msg, stopSeq("sys-net")))
	x.waitState("sys-net", "Halted")
}

func TestQrexecAgentTimeout(t *testing.T) {
	x := newHost(t, simdriver.Config{})
	x.apply(config.Op{Kind: config.OpSetProperty, Domain: "domain-3", Name: "qrexec_timeout", Value: "1"})
	if err := x.lab.SetFaults(context.Background(), "sys-net", simdriver.LabFaultSpec{AgentNeverConnects: true}); err != nil {
		t.Fatal(err)
	}
	msg := "Cannot connect to qrexec agent for 1 seconds, see /var/log/xen/console/guest-sys-net.log for details"
	x.callEvents("admin.vm.Start", "sys-net", "", exc("QubesVMError", msg),
		seq(startSeq("sys-net")[:10], "sys-net domain-start-failed reason="+msg, stopSeq("sys-net")))
}

func TestTransientWhileBooting(t *testing.T) {
	x := newHost(t, simdriver.Config{BootLatency: 300 * time.Millisecond})
	done := make(chan reply, 1)
	go func() { done <- x.call("admin.vm.Start", "sys-net", "") }()
	x.waitState("sys-net", "Transient")
	if r := <-done; r != ok("") {
		t.Fatal(r)
	}
	if st := x.state("sys-net"); st != "Running" {
		t.Errorf("after start: %s", st)
	}
}

func TestUnsolicitedPauseAndPowerOff(t *testing.T) {
	x := newHost(t, simdriver.Config{})
	ctx := context.Background()
	x.call("admin.vm.Start", "sys-net", "")
	mark := x.events.mark()
	if err := x.lab.Pause(ctx, "sys-net"); err != nil {
		t.Fatal(err)
	}
	x.waitState("sys-net", "Paused")
	if err := x.lab.Unpause(ctx, "sys-net"); err != nil {
		t.Fatal(err)
	}
	x.waitState("sys-net", "Running")
	if err := x.lab.PowerOff(ctx, "sys-net"); err != nil {
		t.Fatal(err)
	}
	x.events.expect(t, mark, seq("sys-net domain-paused", "sys-net domain-unpaused", stopSeq("sys-net")))
}

func TestDisposableRemovedAfterShutdown(t *testing.T) {
	x := newHost(t, simdriver.Config{ShutdownLatency: 10 * time.Millisecond})
	disp := func(name, id string) config.Op {
		return config.Op{Kind: config.OpAddDomain, New: &config.Domain{ID: id, Class: "DispVM", Properties: []config.Property{
			{Name: "name", Value: name}, {Name: "qid", Value: id[len("domain-"):]}, {Name: "label", Value: "red"},
			{Name: "uuid", Value: "5b0a3b5e-0d5c-4bb1-9a57-1f0b0c8a7e" + id[len("domain-"):]},
			{Name: "template", Value: "default-dvm"}, {Name: "auto_cleanup", Value: "True"}, {Name: "netvm", Value: ""},
		}}}
	}
	x.apply(disp("disp12", "domain-12"), disp("disp13", "domain-13"))
	for _, c := range []struct{ vm, method, arg string }{{"disp12", "admin.vm.Shutdown", "wait"}, {"disp13", "admin.vm.Kill", ""}} {
		if r := x.call("admin.vm.Start", c.vm, ""); r != ok("") {
			t.Fatal(r)
		}
		want := seq(stopSeq(c.vm), " domain-pre-delete vm="+c.vm, " domain-delete vm="+c.vm)
		if c.method == "admin.vm.Shutdown" {
			want = seq(c.vm+" domain-pre-shutdown force=False", want)
		}
		x.callEvents(c.method, c.vm, c.arg, ok(""), want)
		if _, err := x.rep.ResolveName(context.Background(), c.vm); err == nil {
			t.Errorf("%s is still configured", c.vm)
		}
	}
}
