package devices

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/bus/cloudevent"
	"github.com/qubesbus/qubesbus/bus/qerr"
	"github.com/qubesbus/qubesbus/schemas/device"
	"github.com/qubesbus/qubesbus/schemas/devicectl"
	"github.com/qubesbus/qubesbus/schemas/hostdev"
)

// down hides a backend's devices and drops every attachment of vm (the hypervisor
// when a qube stops or crashes); up shows them again.
func (f *fakeHypervisor) down(vm string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.stopped == nil {
		f.stopped = map[string][]device.Info{}
	}
	f.stopped[vm] = slices.DeleteFunc(slices.Clone(f.devices), func(d device.Info) bool { return d.Backend != vm })
	f.devices = slices.DeleteFunc(f.devices, func(d device.Info) bool { return d.Backend == vm })
	f.attached = slices.DeleteFunc(f.attached, func(a hostdev.Attachment) bool { return a.Backend == vm || a.Frontend == vm })
}

func (f *fakeHypervisor) up(vm string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.devices = append(f.devices, f.stopped[vm]...)
	delete(f.stopped, vm)
}

func (f *fakeHypervisor) plug(d device.Info) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.devices = append(f.devices, d)
}

func (f *fakeHypervisor) unplug(p device.Port) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.devices = slices.DeleteFunc(f.devices, func(d device.Info) bool { return d.Port == p })
	f.attached = slices.DeleteFunc(f.attached, func(a hostdev.Attachment) bool { return a.Port == p })
}

func (f *fakeHypervisor) frontOf(p device.Port) string {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, a := range f.attached {
		if a.Port == p {
			return a.Frontend
		}
	}
	return ""
}

// power stores a power event as the lifecycle service would.
func (h *harness) power(vm, name string, kv ...string) {
	h.t.Helper()
	if err := cloudevent.NewPublisher(h.js, h.Subjects.ID()).Publish(h.Ctx, cloudevent.New(vm, name, kv...)); err != nil {
		h.t.Fatal(err)
	}
}

// started is a qube's start as the services see it: its devices appear, the lifecycle
// says Running and announces domain-start.
func (h *harness) started(vm string) {
	h.t.Helper()
	h.hv.up(vm)
	h.life.set(vm, "Running")
	h.power(vm, "domain-start", "start_guid", "True")
}

// stopped is a qube's stop (or crash): its devices and attachments go, the lifecycle
// says Halted and announces domain-shutdown.
func (h *harness) stopped(vm string) {
	h.t.Helper()
	h.hv.down(vm)
	h.life.set(vm, "Halted")
	h.power(vm, "domain-shutdown")
}

// changed announces a hot-plug as the hypervisor does.
func (h *harness) changed(backend string) {
	h.t.Helper()
	data, _ := json.Marshal(hostdev.Change{Backend: backend})
	if err := h.NC.Publish(h.Subjects.HypervisorDevices(), data); err != nil {
		h.t.Fatal(err)
	}
}

// barrier sends markers down each path the device watch reads, behind everything
// sent on it before: a domain-start of a backend of its own on the events stream (as
// power does), and hot-plugs of other backends on the hypervisor's subject (as
// changed does) until every live instance has handled one. The power events reach
// the instances one at a time, in order (a shared durable consumer with one pending);
// the hot-plugs one instance each, which handles its inputs in order. So once each
// marker is handled, every trigger sent before them has been handled and its events
// are stored.
func (h *harness) barrier() (markers []string) {
	h.t.Helper()
	h.barriers++
	started := fmt.Sprintf("%sstart-%d", barrierPrefix, h.barriers)
	h.hv.plug(device.Info{Port: device.Port{Backend: started, ID: "xvdz", Class: "block"}, DeviceID: ":None"})
	h.power(started, "domain-start")
	markers = append(markers, started)
	covered := map[int]bool{}
	deadline := time.After(20 * time.Second)
	for i := 0; ; i++ {
		plugged := fmt.Sprintf("%splug-%d-%d", barrierPrefix, h.barriers, i)
		h.hv.plug(device.Info{Port: device.Port{Backend: plugged, ID: "xvdz", Class: "block"}, DeviceID: ":None"})
		h.changed(plugged)
		markers = append(markers, plugged)
		// Wait until this marker is handled, then see who has handled one.
		for {
			h.mu.Lock()
			by, ok := h.markedBy[plugged]
			h.mu.Unlock()
			if ok {
				covered[by] = true
				break
			}
			select {
			case <-h.marked:
			case <-deadline:
				h.t.Fatalf("barrier %s not passed", plugged)
			}
		}
		all := true
		for _, id := range h.live() {
			all = all && covered[id]
		}
		if all {
			return markers
		}
	}
}

// barrierPrefix names the barrier's backends (no qube of the fixture).
const barrierPrefix = "barrier-"

// waitEvents asserts that the events stored since the last look, up to a barrier,
// are want exactly: nothing missing, nothing unexpected (nothing twice), in this
// order.
func (h *harness) waitEvents(want ...string) {
	h.t.Helper()
	markers := h.barrier()
	var got []string
	passed := map[string]bool{}
	bustest.CheckFor(h.t, 10*time.Second, 5*time.Millisecond, func() error {
		for _, e := range h.events() {
			vm, ev, _ := strings.Cut(e, "|")
			if !strings.HasPrefix(vm, barrierPrefix) {
				got = append(got, e)
			} else if strings.HasPrefix(ev, "device-added:") {
				passed[vm] = true
			}
		}
		for _, m := range markers {
			if !passed[m] {
				return fmt.Errorf("barrier %s not passed; events so far %q", m, got)
			}
		}
		return nil
	})
	if !slices.Equal(got, want) {
		h.t.Errorf("events:\n got %q\nwant %q", got, want)
	}
}

const sda = "sys-net:sda"

var sdaPort = device.Port{Backend: "sys-net", ID: "sda", Class: "block"}

func TestBackendCrashDetachesAndRemoves(t *testing.T) {
	h := newHarness(t)
	h.life.set("sys-net", "Running")
	h.life.set("work", "Running")
	h.expect("admin.vm.device.block.Attach", "work", "sys-net+sda", "", "0:",
		"work|device-pre-attach:block|device=sys-net:sda::None,options={}",
		"work|device-attach:block|device=sys-net:sda::None,options={'read-only': 'no', 'frontend-dev': 'xvdi'}")
	// sys-net crashes: the lifecycle announces its stop; its device goes, and work
	// loses it (qubesd's on_domain_shutdown: device-removed, then the frontend's detach).
	h.stopped("sys-net")
	h.waitEvents("sys-net|domain-shutdown|",
		"sys-net|device-removed:block|port="+sda,
		"work|device-detach:block|port="+sda)
	h.expect("admin.vm.device.block.Attached", "work", "", "", "0:")
	// It starts again: the device appears; nothing is assigned, so it stays free.
	h.started("sys-net")
	h.waitEvents("sys-net|domain-start|start_guid=True",
		"sys-net|device-list-change:block|",
		"sys-net|device-added:block|device=sys-net:sda::None")
}

func TestAutoAttachWhenBackendStarts(t *testing.T) {
	h := newHarness(t)
	h.life.set("work", "Running")
	h.hv.down("sys-net")
	h.power("sys-net", "domain-shutdown")
	h.waitEvents("sys-net|domain-shutdown|", "sys-net|device-removed:block|port="+sda)
	assign := "device_id=':None' port_id='sda' devclass='block' backend_domain='sys-net' mode='auto-attach' frontend_domain='work'"
	h.expect("admin.vm.device.block.Assign", "work", "sys-net+sda++None", assign, "0:",
		"work|device-pre-assign:block|device=sys-net:sda::None,options={}",
		"work|device-assign:block|device=sys-net:sda::None,options={}")
	h.started("sys-net")
	h.waitEvents("sys-net|domain-start|start_guid=True",
		"sys-net|device-list-change:block|",
		"sys-net|device-added:block|device=sys-net:sda::None",
		"work|device-attach:block|device=sys-net:sda::None,options={'read-only': 'no', 'frontend-dev': 'xvdi'}")
	if got := h.hv.frontOf(sdaPort); got != "work" {
		t.Errorf("sda attached to %q, want work", got)
	}
	// work stops: its device is detached (the backend keeps it).
	h.stopped("work")
	h.waitEvents("work|domain-shutdown|", "work|device-detach:block|port="+sda)
	// work starts again: its auto-attach assignment attaches the device (no pre-event,
	// as qubesd's attach_and_notify).
	h.life.set("work", "Running")
	h.power("work", "domain-start", "start_guid", "True")
	h.waitEvents("work|domain-start|start_guid=True",
		"work|device-attach:block|device=sys-net:sda::None,options={'read-only': 'no', 'frontend-dev': 'xvdi'}")
}

func TestHotPlug(t *testing.T) {
	h := newHarness(t)
	h.life.set("sys-net", "Running")
	h.life.set("work", "Running")
	sdb := device.Info{Port: device.Port{Backend: "sys-net", ID: "sdb1", Class: "block"}, DeviceID: ":1", Name: "STICK",
		Manufacturer: "hosted by sys-net", Interfaces: "b******", Mode: "r"}
	h.hv.plug(sdb)
	h.changed("sys-net")
	h.waitEvents("sys-net|device-list-change:block|", "sys-net|device-added:block|device=sys-net:sdb1::1")
	h.expect("admin.vm.device.block.Attach", "work", "sys-net+sdb1", "", "0:",
		"work|device-pre-attach:block|device=sys-net:sdb1::1,options={}",
		"work|device-attach:block|device=sys-net:sdb1::1,options={'read-only': 'yes', 'frontend-dev': 'xvdi'}")
	// Pulled out while attached: the frontend's detach, then the removal.
	h.hv.unplug(sdb.Port)
	h.changed("sys-net")
	h.waitEvents("sys-net|device-list-change:block|",
		"work|device-detach:block|port=sys-net:sdb1",
		"sys-net|device-removed:block|port=sys-net:sdb1")
	// A change that changes nothing fires nothing.
	h.changed("sys-net")
	h.waitEvents()
}

func TestRequiredDevicesAtStart(t *testing.T) {
	h := newHarness(t)
	assign := "device_id=':None' port_id='sda' devclass='block' backend_domain='sys-net' mode='required' frontend_domain='work'"
	h.expect("admin.vm.device.block.Assign", "work", "sys-net+sda++None", assign, "0:",
		"work|device-pre-assign:block|device=sys-net:sda::None,options={}",
		"work|device-assign:block|device=sys-net:sda::None,options={}")
	cl := devicectl.Client{NC: h.NC, Host: h.Subjects}
	h.hv.down("sys-net")
	err := cl.PrepareStart(h.Ctx, "work")
	var qe *qerr.Error
	if !errors.As(err, &qe) || qe.Class != "QubesException" || qe.Message != "Block device sys-net:sda::None not available" {
		t.Fatalf("PrepareStart without the device: %v", err)
	}
	h.hv.up("sys-net")
	if err := cl.PrepareStart(h.Ctx, "work"); err != nil {
		t.Fatalf("PrepareStart: %v", err)
	}
	if err := cl.AttachRequired(h.Ctx, "work"); err != nil {
		t.Fatalf("AttachRequired: %v", err)
	}
	if got := h.hv.frontOf(sdaPort); got != "work" {
		t.Errorf("sda attached to %q, want work", got)
	}
	if got := h.events(); len(got) != 0 {
		t.Errorf("required devices attach without events, got %q", got)
	}
	// A qube without required devices starts whatever the host has.
	if err := cl.PrepareStart(h.Ctx, "personal"); err != nil {
		t.Errorf("PrepareStart personal: %v", err)
	}
	if err := cl.PrepareStart(h.Ctx, "nosuchvm"); err == nil {
		t.Error("PrepareStart of a missing qube succeeded")
	}
}

// TestMissingPCIDevice: a PCI device assigned to a qube that the host does not have
// (its port 00_1e.0 is absent). qubesd reads the identity of the device at that
// port from libvirt, which answers "Node device not found": at a start (the PCI
// extension's domain-pre-start, whatever the assignment's mode) that fails the
// start; at an Assign or Attach naming the identity qubesd aborts, answered here
// with the same text. A port the host has with another identity is "not available".
func TestMissingPCIDevice(t *testing.T) {
	h := newHarness(t)
	const nodeErr = "Node device not found: no node device with matching name 'pci_0000_00_1e_0'"
	cl := devicectl.Client{NC: h.NC, Host: h.Subjects}
	h.expect("admin.vm.device.pci.Assign", "sys-net", "dom0+00_1e.0+0x8086+0x1234++p028000",
		"device_id='0x8086:0x1234::p028000' port_id='00_1e.0' devclass='pci' backend_domain='dom0' mode='required' frontend_domain='sys-net'",
		"2:QubesException:"+nodeErr)
	// Without an identity qubesd does not look: the assignment is made.
	h.expect("admin.vm.device.pci.Assign", "sys-net", "dom0+00_1e.0",
		"device_id='*' port_id='00_1e.0' devclass='pci' backend_domain='dom0' mode='auto-attach' frontend_domain='sys-net'", "0:",
		"sys-net|device-pre-assign:pci|device=dom0:00_1e.0:*,options={}",
		"sys-net|device-assign:pci|device=dom0:00_1e.0:*,options={}")
	err := cl.PrepareStart(h.Ctx, "sys-net")
	var he *devicectl.HypervisorError
	if !errors.As(err, &he) || he.Msg != nodeErr {
		t.Fatalf("PrepareStart with a missing PCI device: %v", err)
	}
	// Attach to a running qube reads the device too.
	h.life.set("sys-net", "Running")
	h.expect("admin.vm.device.pci.Attach", "sys-net", "dom0+00_1e.0", "", "2:QubesException:"+nodeErr)
	// Once it is gone from the assignments, a required one of a port the host has,
	// with another identity, is not available (qubesd's check after domain-pre-start).
	h.expect("admin.vm.device.pci.Unassign", "sys-net", "dom0+00_1e.0", "", "0:",
		"sys-net|device-unassign:pci|device=dom0:00_1e.0:*")
	h.expect("admin.vm.device.pci.Assign", "sys-net", "dom0+00_14.3+0x8086+0x9999++p028000",
		"device_id='0x8086:0x9999::p028000' port_id='00_14.3' devclass='pci' backend_domain='dom0' mode='required' frontend_domain='sys-net'", "0:",
		"sys-net|device-pre-assign:pci|device=dom0:00_14.3:0x8086:0x9999::p028000,options={}",
		"sys-net|device-assign:pci|device=dom0:00_14.3:0x8086:0x9999::p028000,options={}")
	var qe *qerr.Error
	if err := cl.PrepareStart(h.Ctx, "sys-net"); !errors.As(err, &qe) || qe.Class != "QubesException" ||
		qe.Message != "Pci device dom0:00_14.3:0x8086:0x9999::p028000 not available" {
		t.Fatalf("PrepareStart with another device at the port: %v", err)
	}
}

// TestFirewallReloadedWhenNetvmStarts: a netvm that starts gets the rules of its
// running clients in its table, which starts empty (qubesd writes them into the
// netvm's new QubesDB at its domain-qdb-create); while it is halted nothing is
// written for it (reload_firewall_for_vm returns when the netvm does not run).
func TestFirewallReloadedWhenNetvmStarts(t *testing.T) {
	h := newHarness(t)
	kv, err := h.js.KeyValue(h.Ctx, FirewallBucket)
	if err != nil {
		t.Fatal(err)
	}
	key := func(ip, entry string) string { return FirewallKey(h.Subjects.ID(), "sys-firewall", ip, entry) }
	table := func() map[string]string {
		t.Helper()
		out := map[string]string{}
		lister, err := kv.ListKeys(h.Ctx)
		if errors.Is(err, jetstream.ErrNoKeysFound) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		for k := range lister.Keys() {
			if !strings.HasPrefix(k, h.Subjects.ID()+"/sys-firewall/qubes-firewall/") {
				continue
			}
			e, err := kv.Get(h.Ctx, k)
			if err != nil {
				t.Fatal(err)
			}
			out[k] = string(e.Value())
		}
		return out
	}
	h.life.set("work", "Running")
	h.expect("admin.vm.firewall.Set", "work", "", "action=accept proto=tcp dstports=443\naction=drop\n", "0:",
		"work|firewall-changed|")
	if got := table(); len(got) != 0 {
		t.Fatalf("rules written for a halted netvm: %q", got)
	}
	// What the table holds from before: stale rules of work, a client gone.
	for k, v := range map[string]string{key("10.137.0.5", "0000"): "action=accept", key("10.137.0.5", "0005"): "action=drop",
		key("10.137.0.5", ""): "", key("10.137.0.99", "policy"): "accept", key("10.137.0.99", ""): ""} {
		if _, err := kv.PutString(h.Ctx, k, v); err != nil {
			t.Fatal(err)
		}
	}
	h.life.set("sys-firewall", "Running")
	h.power("sys-firewall", "domain-start", "start_guid", "True")
	h.waitEvents("sys-firewall|domain-start|start_guid=True")
	want := map[string]string{
		key("10.137.0.5", "policy"): "drop",
		key("10.137.0.5", "0000"):   "action=accept proto=tcp dstports=443-443",
		key("10.137.0.5", "0001"):   "action=drop",
		key("10.137.0.5", ""):       "",
	}
	if got := table(); !maps.Equal(got, want) {
		t.Errorf("sys-firewall's table after its start:\n got %q\nwant %q", got, want)
	}
}

// TestHostRestartForgetsTheLastBoot: the records outlive a restart of the whole host
// (the bucket stays), but the domains and attachments of the last boot are gone. As
// qubesd's cache after it restarts, a record of another boot counts as none: the
// backend that starts again announces its device as added, and nobody's detach of an
// attachment that ended with the old boot is announced.
func TestHostRestartForgetsTheLastBoot(t *testing.T) {
	h := newHarness(t)
	h.hv.mu.Lock()
	h.hv.boot = "boot-1"
	h.hv.mu.Unlock()
	h.life.set("sys-net", "Running")
	h.life.set("work", "Running")
	h.expect("admin.vm.device.block.Attach", "work", "sys-net+sda", "", "0:",
		"work|device-pre-attach:block|device=sys-net:sda::None,options={}",
		"work|device-attach:block|device=sys-net:sda::None,options={'read-only': 'no', 'frontend-dev': 'xvdi'}")

	// The host restarts: the service stops, every domain is gone, the hypervisor has
	// booted again, and a new instance starts on the same bucket.
	h.kill(h.instances[0])
	h.hv.down("sys-net")
	h.hv.down("work")
	h.hv.mu.Lock()
	h.hv.boot = "boot-2"
	h.hv.mu.Unlock()
	h.life.set("sys-net", "Halted")
	h.life.set("work", "Halted")
	h.serve()
	h.expect("admin.vm.device.block.Attached", "work", "", "", "0:")

	h.started("sys-net")
	h.waitEvents("sys-net|domain-start|start_guid=True",
		"sys-net|device-list-change:block|",
		"sys-net|device-added:block|device=sys-net:sda::None")
	h.expect("admin.vm.device.block.Available", "sys-net", "", "", "0:sda::None device_id=':None' port_id='sda' devclass='block' backend_domain='sys-net' name='DT-USB' serial='Kingston DataTraveler 3.0' manufacturer='hosted by sys-net' interfaces='b******'\n")
}
