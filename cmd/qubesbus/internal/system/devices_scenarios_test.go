package system

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/access"
	"github.com/qubesbus/qubesbus/services/vmlifecycle/simdriver"
)

// deviceFrames keeps the device events of frames, and the domain-shutdown and
// domain-start of the qubes named, as "vm|event|k=v,…".
func deviceFrames(frames []string, power ...string) []string {
	var out []string
	for _, f := range frames {
		parts := strings.Split(strings.TrimSuffix(strings.TrimPrefix(f, "1\x00"), "\x00\x00"), "\x00")
		if len(parts) < 2 {
			continue
		}
		vm, name := parts[0], parts[1]
		if !strings.HasPrefix(name, "device-") && !((name == "domain-shutdown" || name == "domain-start") && slices.Contains(power, vm)) {
			continue
		}
		var kw []string
		for i := 2; i+1 < len(parts); i += 2 {
			kw = append(kw, parts[i]+"="+parts[i+1])
		}
		out = append(out, vm+"|"+name+"|"+strings.Join(kw, ","))
	}
	return out
}

// settled returns the events after mark once the recorder holds every event the
// stream has now: a call replies after its events are stored, so after a call
// these are all of its events.
func (l *lifeEvents) settled(t *testing.T, mark uint64) []string {
	t.Helper()
	last := l.mark(t)
	bustest.CheckFor(t, 10*time.Second, 5*time.Millisecond, func() error {
		if rs := l.rec.Since(mark); last > mark && (len(rs) == 0 || rs[len(rs)-1].Seq < last) {
			return fmt.Errorf("recorded %d events after %d, the stream has up to %d", len(rs), mark, last)
		}
		return nil
	})
	return l.since(mark)
}

func call(t *testing.T, sys *System, method, dest, arg, payload string) string {
	t.Helper()
	if arg != "" {
		method += "+" + arg
	}
	return string(roundTrip(t, sys.Socket, []byte(method+" dom0 name "+dest+"\x00"+payload)))
}

// TestDeviceScenarios runs, on a whole host, a start that lacks a required device, the
// backend's start (its device appears), the start that now attaches it, a hot-plug
// and unplug through the lab, and the backend's crash, with the exact device events
// each fires.
func TestDeviceScenarios(t *testing.T) {
	sys := startSystem(t)
	evs := captureLifeEvents(t, sys, "test")
	lab := simdriver.LabClient{NC: connectAs(t, sys, access.Lab), Host: subject.ForHost("test")}
	ctx := context.Background()
	expect := func(mark uint64, power []string, want ...string) {
		t.Helper()
		var got []string
		bustest.CheckFor(t, 15*time.Second, 20*time.Millisecond, func() error {
			got = deviceFrames(evs.since(mark), power...)
			if len(got) < len(want) {
				return fmt.Errorf("device events so far %q", got)
			}
			return nil
		})
		if !slices.Equal(got, want) {
			t.Errorf("events:\n got %q\nwant %q", got, want)
		}
	}
	ok := func(got string) {
		t.Helper()
		if !strings.HasPrefix(got, "0\x00") {
			t.Fatalf("call failed: %q", got)
		}
	}

	// work requires sys-net's sda; sys-net is halted, so the start fails as in qubesd,
	// before anything else of the start (its netvms stay halted).
	ok(call(t, sys, "admin.vm.device.block.Assign", "work", "sys-net+sda++None",
		"device_id=':None' port_id='sda' devclass='block' backend_domain='sys-net' mode='required' frontend_domain='work'"))
	mark := evs.mark(t)
	got := call(t, sys, "admin.vm.Start", "work", "", "")
	if want := "2\x00QubesException\x00\x00Block device sys-net:sda::None not available\x00"; got != want {
		t.Errorf("start without the device: %q, want %q", got, want)
	}
	// The events are stored before the reply, but the recorder reads them from the
	// stream on its own: wait until it has both.
	var work []string
	for _, f := range evs.settled(t, mark) {
		work = append(work, strings.SplitN(strings.TrimPrefix(f, "1\x00"), "\x00", 3)[1])
	}
	if want := []string{"domain-pre-start", "domain-start-failed"}; !slices.Equal(work, want) {
		t.Errorf("failed start events %q, want %q", work, want)
	}

	// sys-net starts: its block device appears.
	mark = evs.mark(t)
	ok(call(t, sys, "admin.vm.Start", "sys-net", "", ""))
	expect(mark, []string{"sys-net"}, "sys-net|domain-start|start_guid=True",
		"sys-net|device-list-change:block|", "sys-net|device-added:block|device=sys-net:sda::None")

	// Now work starts with the device attached (part of its domain: no event).
	mark = evs.mark(t)
	ok(call(t, sys, "admin.vm.Start", "work", "", ""))
	if got := call(t, sys, "admin.vm.device.block.Attached", "work", "", ""); !strings.Contains(got, "port_id='sda'") || !strings.Contains(got, "mode='required'") {
		t.Errorf("work's attached devices: %q", got)
	}

	// A stick plugged into sys-net, then pulled out.
	mark = evs.mark(t)
	if err := lab.Plug(ctx, simdriver.BlockDevice("sys-net", "sdb1", "SanDisk_Cruzer (STICK)", 8<<30, "r")); err != nil {
		t.Fatal(err)
	}
	expect(mark, nil, "sys-net|device-list-change:block|", "sys-net|device-added:block|device=sys-net:sdb1::1")
	mark = evs.mark(t)
	if err := lab.Unplug(ctx, simdriver.BlockDevice("sys-net", "sdb1", "", 0, "r").Port); err != nil {
		t.Fatal(err)
	}
	expect(mark, nil, "sys-net|device-list-change:block|", "sys-net|device-removed:block|port=sys-net:sdb1")

	// sys-net crashes with sda attached to work: after its domain-shutdown, the device
	// is removed and work's attachment goes (qubesd's block extension on
	// domain-shutdown).
	mark = evs.mark(t)
	if err := lab.Crash(ctx, "sys-net"); err != nil {
		t.Fatal(err)
	}
	expect(mark, []string{"sys-net"}, "sys-net|domain-shutdown|",
		"sys-net|device-removed:block|port=sys-net:sda", "work|device-detach:block|port=sys-net:sda")
	if got := call(t, sys, "admin.vm.device.block.Attached", "work", "", ""); got != "0\x00" {
		t.Errorf("work's attached devices after the crash: %q", got)
	}
}

// TestStartWithMissingPCIDevice: a qube with a PCI device assigned that the host does
// not have fails to start as qubesd's does (recorded on the oracle): its PCI
// extension looks the device up in libvirt at domain-pre-start, whatever the
// assignment's mode, and admin.vm.Start wraps libvirt's error; domain-start-failed
// carries it bare, and nothing else of the start happens.
func TestStartWithMissingPCIDevice(t *testing.T) {
	sys := startSystem(t)
	evs := captureLifeEvents(t, sys, "test")
	const nodeErr = "Node device not found: no node device with matching name 'pci_0000_00_1e_0'"
	for _, mode := range []string{"required", "auto-attach"} {
		payload := "device_id='*' port_id='00_1e.0' devclass='pci' backend_domain='dom0' mode='" + mode + "' frontend_domain='personal'"
		if got := call(t, sys, "admin.vm.device.pci.Assign", "personal", "dom0+00_1e.0", payload); got != "0\x00" {
			t.Fatalf("assign (%s): %q", mode, got)
		}
		mark := evs.mark(t)
		got := call(t, sys, "admin.vm.Start", "personal", "", "")
		if want := "2\x00QubesException\x00\x00Start failed: " + nodeErr + ", see /var/log/libvirt/libxl/libxl-driver.log for details\x00"; got != want {
			t.Errorf("start (%s): %q, want %q", mode, got, want)
		}
		want := []string{
			"1\x00personal\x00domain-pre-start\x00start_guid\x00True\x00mem_required\x00None\x00\x00",
			"1\x00personal\x00domain-start-failed\x00reason\x00" + nodeErr + "\x00\x00",
		}
		if got := evs.settled(t, mark); !slices.Equal(got, want) {
			t.Errorf("events (%s):\n got %q\nwant %q", mode, got, want)
		}
		if got := call(t, sys, "admin.vm.device.pci.Unassign", "personal", "dom0+00_1e.0", ""); got != "0\x00" {
			t.Fatalf("unassign (%s): %q", mode, got)
		}
	}
	// A port the host has, with another device's identity: not available.
	payload := "device_id='0x8086:0x9999::p028000' port_id='00_14.3' devclass='pci' backend_domain='dom0' mode='required' frontend_domain='personal'"
	if got := call(t, sys, "admin.vm.device.pci.Assign", "personal", "dom0+00_14.3+0x8086+0x9999++p028000", payload); got != "0\x00" {
		t.Fatalf("assign: %q", got)
	}
	if got, want := call(t, sys, "admin.vm.Start", "personal", "", ""), "2\x00QubesException\x00\x00Pci device dom0:00_14.3:0x8086:0x9999::p028000 not available\x00"; got != want {
		t.Errorf("start: %q, want %q", got, want)
	}
}
