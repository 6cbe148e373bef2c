package devices

import (
	"context"
	"errors"
	"testing"

	"github.com/qubesbus/qubesbus/schemas/device"
)

const attachSda = "work|device-attach:block|device=sys-net:sda::None,options={'read-only': 'no', 'frontend-dev': 'xvdi'}"

// TestTwoInstancesFireEachEventOnce: two devices instances serve one host. The
// hypervisor's notices of a hot-plug come several times (so both instances may
// rescan the same backend at once) and a backend's domain-start races its notices;
// each event is fired once all the same, whichever instance handles what.
func TestTwoInstancesFireEachEventOnce(t *testing.T) {
	h := newHarnessN(t, fixture, 2)
	h.life.set("sys-net", "Running")
	h.life.set("work", "Running")
	sdb := device.Info{Port: device.Port{Backend: "sys-net", ID: "sdb1", Class: "block"}, DeviceID: ":1", Name: "STICK",
		Manufacturer: "hosted by sys-net", Interfaces: "b******", Mode: "r"}
	h.hv.plug(sdb)
	for range 4 {
		h.changed("sys-net")
	}
	h.waitEvents("sys-net|device-list-change:block|", "sys-net|device-added:block|device=sys-net:sdb1::1")

	// Attach and Detach, on whichever instance serves each call, update the record:
	// the backend's crash below detaches sdb1 from work, not sda.
	h.expect("admin.vm.device.block.Attach", "work", "sys-net+sdb1", "", "0:",
		"work|device-pre-attach:block|device=sys-net:sdb1::1,options={}",
		"work|device-attach:block|device=sys-net:sdb1::1,options={'read-only': 'yes', 'frontend-dev': 'xvdi'}")
	h.expect("admin.vm.device.block.Attach", "work", "sys-net+sda", "", "0:",
		"work|device-pre-attach:block|device=sys-net:sda::None,options={}",
		"work|device-attach:block|device=sys-net:sda::None,options={'read-only': 'no', 'frontend-dev': 'xvdj'}")
	h.expect("admin.vm.device.block.Detach", "work", "sys-net+sda", "", "0:",
		"work|device-pre-detach:block|port=sys-net:sda",
		"work|device-detach:block|port=sys-net:sda")
	h.changed("sys-net") // nothing changed behind the record's back
	h.waitEvents()

	// The backend crashes.
	h.stopped("sys-net")
	h.waitEvents("sys-net|domain-shutdown|",
		"sys-net|device-removed:block|port="+sda,
		"sys-net|device-removed:block|port=sys-net:sdb1",
		"work|device-detach:block|port=sys-net:sdb1")

	// It starts again, and the hypervisor announces its devices too: the start's
	// rescan and the notices' race for the record; one of them announces them.
	h.started("sys-net")
	for range 3 {
		h.changed("sys-net")
	}
	h.waitEvents("sys-net|domain-start|start_guid=True",
		"sys-net|device-list-change:block|",
		"sys-net|device-added:block|device=sys-net:sda::None",
		"sys-net|device-added:block|device=sys-net:sdb1::1")
}

// TestTwoInstancesAutoAttachOnce: an auto-attach assignment is carried out once when
// its backend starts, though both instances see the devices appear.
func TestTwoInstancesAutoAttachOnce(t *testing.T) {
	h := newHarnessN(t, fixture, 2)
	h.life.set("work", "Running")
	h.hv.down("sys-net")
	h.power("sys-net", "domain-shutdown")
	h.waitEvents("sys-net|domain-shutdown|", "sys-net|device-removed:block|port="+sda)
	assign := "device_id=':None' port_id='sda' devclass='block' backend_domain='sys-net' mode='auto-attach' frontend_domain='work'"
	h.expect("admin.vm.device.block.Assign", "work", "sys-net+sda++None", assign, "0:",
		"work|device-pre-assign:block|device=sys-net:sda::None,options={}",
		"work|device-assign:block|device=sys-net:sda::None,options={}")
	h.started("sys-net")
	for range 3 {
		h.changed("sys-net")
	}
	h.waitEvents("sys-net|domain-start|start_guid=True",
		"sys-net|device-list-change:block|",
		"sys-net|device-added:block|device=sys-net:sda::None",
		attachSda)
	if got := h.hv.frontOf(sdaPort); got != "work" {
		t.Errorf("sda attached to %q, want work", got)
	}
}

// TestInstanceStopsOtherCarriesOn: one of two instances stops while a power event is
// on its way; the other handles it and everything after, each event once.
func TestInstanceStopsOtherCarriesOn(t *testing.T) {
	h := newHarnessN(t, fixture, 2)
	h.life.set("sys-net", "Running")
	h.life.set("work", "Running")
	h.expect("admin.vm.device.block.Attach", "work", "sys-net+sda", "", "0:",
		"work|device-pre-attach:block|device=sys-net:sda::None,options={}",
		attachSda)
	h.waitEvents()

	// sys-net crashes; instance 1 stops at the same time, whether or not it took the
	// event: what it took it finishes, what it did not the other gets.
	h.stopped("sys-net")
	h.kill(h.instances[1])
	h.waitEvents("sys-net|domain-shutdown|",
		"sys-net|device-removed:block|port="+sda,
		"work|device-detach:block|port="+sda)

	// The one left serves on: a restart of the backend, a hot-plug, an attach.
	h.started("sys-net")
	h.waitEvents("sys-net|domain-start|start_guid=True",
		"sys-net|device-list-change:block|",
		"sys-net|device-added:block|device=sys-net:sda::None")
	sdb := device.Info{Port: device.Port{Backend: "sys-net", ID: "sdb1", Class: "block"}, DeviceID: ":1",
		Manufacturer: "hosted by sys-net", Interfaces: "b******"}
	h.hv.plug(sdb)
	h.changed("sys-net")
	h.waitEvents("sys-net|device-list-change:block|", "sys-net|device-added:block|device=sys-net:sdb1::1")
	h.expect("admin.vm.device.block.Attach", "work", "sys-net+sdb1", "", "0:",
		"work|device-pre-attach:block|device=sys-net:sdb1::1,options={}",
		"work|device-attach:block|device=sys-net:sdb1::1,options={'read-only': 'no', 'frontend-dev': 'xvdi'}")
	h.hv.unplug(sdb.Port)
	h.changed("sys-net")
	h.waitEvents("sys-net|device-list-change:block|",
		"work|device-detach:block|port=sys-net:sdb1",
		"sys-net|device-removed:block|port=sys-net:sdb1")

	// A new instance joins and finds the records as they are.
	h.serve()
	h.changed("sys-net")
	h.waitEvents()
}

// TestStopDoesNotWaitOutAStalledHypervisor: an instance stops while its watch handles a
// hot-plug notice and the hypervisor answers nothing (in one process it stops with
// the same context). The handling is given up drainWait after the stop, by cancelling
// it, not when the WriteTimeout expires, so the process's stop is not held up.
func TestStopDoesNotWaitOutAStalledHypervisor(t *testing.T) {
	h := newHarness(t)
	stalled := make(chan context.Context, 1)
	h.hv.mu.Lock()
	h.hv.stalled = stalled
	h.hv.mu.Unlock()
	h.changed("sys-net")
	ctx := <-stalled // the watch is in the hypervisor call
	h.kill(h.instances[0])
	if err := ctx.Err(); !errors.Is(err, context.Canceled) {
		t.Fatalf("the stalled call ended with %v, want it cancelled by the stop", err)
	}
}
