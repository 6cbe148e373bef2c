package vmlifecycle_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/qubesbus/qubesbus/bus/qerr"
	"github.com/qubesbus/qubesbus/schemas/config"
	"github.com/qubesbus/qubesbus/services/vmlifecycle"
	"github.com/qubesbus/qubesbus/services/vmlifecycle/simdriver"
)

// vm is the qube of the transition table: no netvm, qrexec through its template.
const vm = "sys-net"

var ops = map[string]struct{ method, arg string }{
	"Start":          {"admin.vm.Start", ""},
	"Shutdown":       {"admin.vm.Shutdown", ""},
	"Shutdown+force": {"admin.vm.Shutdown", "force"},
	"Kill":           {"admin.vm.Kill", ""},
	"Pause":          {"admin.vm.Pause", ""},
	"Unpause":        {"admin.vm.Unpause", ""},
	"Suspend":        {"admin.vm.Suspend", ""},
	"Resume":         {"admin.vm.Resume", ""},
}

// reach brings vm from Halted into a power state and returns the event mark after it.
func reach(t *testing.T, x *host, state string) {
	t.Helper()
	ctx := context.Background()
	start := func() {
		if r := x.call("admin.vm.Start", vm, ""); r != ok("") {
			t.Fatalf("start: %v", r)
		}
	}
	switch state {
	case "Halted":
		return
	case "Running":
		start()
	case "Paused":
		start()
		x.call("admin.vm.Pause", vm, "")
	case "Suspended":
		start()
		x.call("admin.vm.Suspend", vm, "")
	case "Halting":
		if err := x.lab.SetFaults(ctx, vm, simdriver.LabFaultSpec{ShutdownHangs: true}); err != nil {
			t.Fatal(err)
		}
		start()
		x.call("admin.vm.Shutdown", vm, "")
	case "Crashed":
		if err := x.lab.SetFaults(ctx, vm, simdriver.LabFaultSpec{PreserveCrash: true}); err != nil {
			t.Fatal(err)
		}
		start()
		if err := x.lab.Crash(ctx, vm); err != nil {
			t.Fatal(err)
		}
	case "Transient":
		// A start waits for the qrexec agent holding the qube's lock; a service that
		// stops meanwhile leaves the domain booting, and the next one adopts it.
		boot := int64(time.Hour / time.Millisecond)
		if _, err := x.lab.Configure(ctx, simdriver.LabConfig{BootLatencyMS: &boot}); err != nil {
			t.Fatal(err)
		}
		sctx, cancel := context.WithCancel(ctx)
		done := make(chan error, 1)
		go func() { done <- x.svc.Start(sctx, vm) }()
		x.waitState(vm, "Transient")
		cancel()
		if err := <-done; !errors.Is(err, qerr.ErrAbort) {
			t.Fatalf("interrupted start: %v", err)
		}
		x.stopService()
		x.startService()
	default:
		t.Fatalf("cannot reach %s", state)
	}
	x.waitState(vm, state)
}

func TestTransitionTable(t *testing.T) {
	q := "'" + vm + "'"
	var (
		stop       = stopSeq(vm)
		preShut    = vm + " domain-pre-shutdown force=False"
		preShutF   = vm + " domain-pre-shutdown force=True"
		prePaused  = vm + " domain-pre-paused"
		paused     = vm + " domain-paused"
		preUnpause = vm + " domain-pre-unpaused"
		unpaused   = vm + " domain-unpaused"
		notStarted = exc("QubesVMNotStartedError", "Domain is powered off: "+q)
		notRunning = exc("QubesVMNotRunningError", "Domain not running (either powered off or paused): "+q)
		notPaused  = exc("QubesVMNotPausedError", "Domain is not paused: "+q)
		timedOut   = exc("QubesVMShutdownTimeoutError", "Domain shutdown timed out: "+q)
		// qubesd asks a qrexec qube to prepare first (qubes.SuspendPre), which a
		// paused one refuses; the qube here has qrexec.
		isPaused = exc("QubesVMNotRunningError", "Domain "+q+" is paused")
	)
	cases := []struct {
		from, op string
		want     reply
		events   []string
		to       string
	}{
		{"Halted", "Start", ok(""), startSeq(vm), "Running"},
		{"Halted", "Shutdown", notStarted, nil, "Halted"},
		{"Halted", "Shutdown+force", notStarted, nil, "Halted"},
		{"Halted", "Kill", notStarted, nil, "Halted"},
		{"Halted", "Pause", notRunning, nil, "Halted"},
		{"Halted", "Unpause", notPaused, nil, "Halted"},
		{"Halted", "Suspend", notRunning, nil, "Halted"},
		{"Halted", "Resume", notPaused, nil, "Halted"},

		{"Transient", "Start", ok(""), nil, "Transient"},
		{"Transient", "Shutdown", ok(""), seq(preShut, stop), "Halted"},
		{"Transient", "Shutdown+force", ok(""), seq(preShutF, stop), "Halted"},
		{"Transient", "Kill", ok(""), stop, "Halted"},
		{"Transient", "Pause", ok(""), seq(prePaused, paused), "Paused"},
		{"Transient", "Unpause", notPaused, nil, "Transient"},
		{"Transient", "Suspend", ok(""), nil, "Suspended"},
		{"Transient", "Resume", notPaused, nil, "Transient"},

		{"Running", "Start", ok(""), nil, "Running"},
		{"Running", "Shutdown", ok(""), seq(preShut, stop), "Halted"},
		{"Running", "Shutdown+force", ok(""), seq(preShutF, stop), "Halted"},
		{"Running", "Kill", ok(""), stop, "Halted"},
		{"Running", "Pause", ok(""), seq(prePaused, paused), "Paused"},
		{"Running", "Unpause", notPaused, nil, "Running"},
		{"Running", "Suspend", ok(""), nil, "Suspended"},
		{"Running", "Resume", notPaused, nil, "Running"},

		{"Paused", "Start", ok(""), nil, "Paused"},
		{"Paused", "Shutdown", notRunning, seq(preShut, vm+" domain-shutdown-failed reason=Domain not running (either powered off or paused): "+q), "Paused"},
		{"Paused", "Shutdown+force", ok(""), seq(preShutF, stop), "Halted"},
		{"Paused", "Kill", ok(""), stop, "Halted"},
		{"Paused", "Pause", ok(""), seq(prePaused, paused), "Paused"},
		{"Paused", "Unpause", ok(""), seq(preUnpause, unpaused), "Running"},
		{"Paused", "Suspend", isPaused, nil, "Paused"},
		{"Paused", "Resume", ok(""), seq(preUnpause, unpaused), "Running"},

		{"Suspended", "Start", ok(""), nil, "Suspended"},
		{"Suspended", "Shutdown", ok(""), seq(preShut, stop), "Halted"},
		{"Suspended", "Shutdown+force", ok(""), seq(preShutF, stop), "Halted"},
		{"Suspended", "Kill", ok(""), stop, "Halted"},
		{"Suspended", "Pause", ok(""), seq(prePaused, paused), "Paused"},
		{"Suspended", "Unpause", notPaused, nil, "Suspended"},
		{"Suspended", "Suspend", ok(""), nil, "Suspended"},
		{"Suspended", "Resume", ok(""), seq(vm + " domain-resumed"), "Running"},

		{"Halting", "Start", ok(""), nil, "Halting"},
		{"Halting", "Shutdown", ok(""), seq(preShut), "Halting"},
		{"Halting", "Shutdown+force", ok(""), seq(preShutF), "Halting"},
		{"Halting", "Kill", ok(""), stop, "Halted"},
		{"Halting", "Pause", ok(""), seq(prePaused, paused), "Paused"},
		{"Halting", "Unpause", notPaused, nil, "Halting"},
		{"Halting", "Suspend", ok(""), seq(prePaused, paused), "Paused"},
		{"Halting", "Resume", notPaused, nil, "Halting"},

		{"Crashed", "Start", ok(""), nil, "Crashed"},
		{"Crashed", "Shutdown", timedOut, seq(preShut, vm+" domain-shutdown-failed reason=Domain shutdown timed out: "+q), "Crashed"},
		{"Crashed", "Shutdown+force", timedOut, seq(preShutF, vm+" domain-shutdown-failed reason=Domain shutdown timed out: "+q), "Crashed"},
		{"Crashed", "Kill", ok(""), stop, "Halted"},
		{"Crashed", "Pause", abort, seq(prePaused), "Crashed"},
		{"Crashed", "Unpause", notPaused, nil, "Crashed"},
		{"Crashed", "Suspend", abort, nil, "Crashed"},
		{"Crashed", "Resume", notPaused, nil, "Crashed"},
	}
	for _, c := range cases {
		t.Run(c.from+"/"+c.op, func(t *testing.T) {
			t.Parallel()
			x := newHost(t, simdriver.Config{ShutdownLatency: 20 * time.Millisecond})
			reach(t, x, c.from)
			mark := x.events.mark()
			op := ops[c.op]
			if got := x.call(op.method, vm, op.arg); got != c.want {
				t.Fatalf("%s from %s: got %v, want %v", c.op, c.from, got, c.want)
			}
			x.events.expect(t, mark, c.events)
			x.waitState(vm, c.to)
		})
	}
}

// TestAdminVMAndRemoteVM: dom0 and RemoteVMs have no domain to act on.
func TestAdminVMAndRemoteVM(t *testing.T) {
	x := newHost(t, simdriver.Config{})
	x.apply(config.Op{Kind: config.OpAddDomain, New: &config.Domain{ID: "domain-20", Class: "RemoteVM",
		Properties: []config.Property{{Name: "name", Value: "far"}, {Name: "qid", Value: "20"}, {Name: "label", Value: "red"},
			{Name: "uuid", Value: "9a3c3fd2-5d39-4c0a-9bd7-2c9b1d8e3b11"}}}})
	cases := []struct {
		dest, op string
		want     reply
	}{
		{"dom0", "Start", exc("QubesVMNotHaltedError", "Cannot start Dom0 fake domain!")},
		{"dom0", "Shutdown", abort},
		{"dom0", "Kill", exc("QubesVMError", "Cannot kill Dom0 fake domain!")},
		{"dom0", "Pause", abort},
		{"dom0", "Unpause", abort},
		{"dom0", "Suspend", exc("QubesVMError", "Cannot suspend Dom0 fake domain!")},
		{"dom0", "Resume", abort},
		{"far", "Start", exc("QubesVMNotHaltedError", "Cannot start a RemoteVM.")},
		{"far", "Shutdown", abort},
		{"far", "Kill", exc("QubesVMError", "Cannot kill a RemoteVM.")},
		{"far", "Pause", abort},
		{"far", "Unpause", abort},
		{"far", "Suspend", exc("QubesVMError", "Cannot suspend a RemoteVM.")},
		{"far", "Resume", abort},
	}
	mark := x.events.mark()
	for _, c := range cases {
		op := ops[c.op]
		if got := x.call(op.method, c.dest, op.arg); got != c.want {
			t.Errorf("%s %s: got %v, want %v", c.op, c.dest, got, c.want)
		}
	}
	if got := x.call("admin.vm.CurrentState", "far", ""); got != ok("mem=0 mem_static_max=0 cputime=0 power_state=Running") {
		t.Errorf("RemoteVM CurrentState: %v", got)
	}
	if st := x.state("dom0"); st != "Running" {
		t.Errorf("dom0 is %s", st)
	}
	if got := x.events.since(mark); len(got) != 0 {
		t.Errorf("events: %v", got)
	}
}

func TestShutdownArgument(t *testing.T) {
	x := newHost(t, simdriver.Config{})
	for _, arg := range []string{"bogus", "force+", "+wait", "force+wait+now", "Force"} {
		if got := x.call("admin.vm.Shutdown", "work", arg); got != exc("ProtocolError", "Argument must match: force, wait") {
			t.Errorf("arg %q: %v", arg, got)
		}
	}
	for _, arg := range []string{"", "force", "wait", "force+wait", "wait+force"} {
		o, err := vmlifecycle.ParseShutdownArg(arg)
		if err != nil {
			t.Errorf("arg %q: %v", arg, err)
		}
		if want := (vmlifecycle.ShutdownOptions{Force: arg != "" && arg != "wait", Wait: len(arg) > 0 && arg != "force"}); o != want {
			t.Errorf("arg %q: %+v, want %+v", arg, o, want)
		}
		if got := x.call("admin.vm.Shutdown", "work", arg); got != exc("QubesVMNotStartedError", "Domain is powered off: 'work'") {
			t.Errorf("arg %q on a halted qube: %v", arg, got)
		}
	}
}
