package devices

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/internal/testhost"
	"github.com/qubesbus/qubesbus/schemas/config"
	"github.com/qubesbus/qubesbus/schemas/device"
	"github.com/qubesbus/qubesbus/schemas/hostdev"
	"github.com/qubesbus/qubesbus/schemas/model"
)

const fixture = "../../testdata/qubes.xml"

// fakeLifecycle: qubes are in the states set here (dom0 runs).
type fakeLifecycle struct {
	mu     sync.Mutex
	states map[string]string
}

func (f *fakeLifecycle) RuntimeSnapshot(context.Context) (model.RuntimeSnapshot, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	vals := map[string]model.Runtime{"dom0": {State: "Running", XID: 0, StubdomXID: -1}}
	for k, v := range f.states {
		r := model.Halted
		r.State = v
		vals[k] = r
	}
	return model.RuntimeSnapshot{Values: vals}, nil
}

func (f *fakeLifecycle) set(vm, state string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.states == nil {
		f.states = map[string]string{}
	}
	f.states[vm] = state
}

// fakeHypervisor holds devices and attachments in memory (the simulated hypervisor
// is tested with its own tests and, end to end, by the replays in cmd/qubesbus).
type fakeHypervisor struct {
	mu       sync.Mutex
	devices  []device.Info
	attached []hostdev.Attachment
	stopped  map[string][]device.Info // devices of stopped backends (watch_test.go)
	boot     string                   // the hypervisor's boot (Inventory.Boot)
	// stalled, if set, makes Devices answer nothing: it sends its caller's context
	// on stalled and waits for it to end, as a hypervisor that stopped serving.
	stalled chan context.Context
}

func (f *fakeHypervisor) Devices(ctx context.Context) (hostdev.Inventory, error) {
	f.mu.Lock()
	if stalled := f.stalled; stalled != nil {
		f.mu.Unlock()
		stalled <- ctx
		<-ctx.Done()
		return hostdev.Inventory{}, ctx.Err()
	}
	defer f.mu.Unlock()
	inv := hostdev.Inventory{Attached: slices.Clone(f.attached), Boot: f.boot}
	for _, d := range f.devices {
		for _, a := range f.attached {
			if a.Port == d.Port {
				d.Attachment = a.Frontend
			}
		}
		inv.Devices = append(inv.Devices, d)
	}
	return inv, nil
}

func (f *fakeHypervisor) Attach(_ context.Context, a hostdev.Attachment) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, x := range f.attached {
		if x.Port == a.Port {
			return hostdev.ErrAttached
		}
	}
	f.attached = append(f.attached, a)
	return nil
}

func (f *fakeHypervisor) Detach(_ context.Context, a hostdev.Attachment) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := len(f.attached)
	f.attached = slices.DeleteFunc(f.attached, func(x hostdev.Attachment) bool { return x.Port == a.Port && x.Frontend == a.Frontend })
	if len(f.attached) == n {
		return hostdev.ErrNotAttached
	}
	return nil
}

type harness struct {
	*testhost.Host
	t        testing.TB
	seq      uint64
	barriers int // markers sent by barrier (watch_test.go)
	life     *fakeLifecycle
	hv       *fakeHypervisor
	clock    atomic.Int64
	js       jetstream.JetStream

	// The devices instances serving the host, and which instance handled each
	// barrier marker (watch_test.go).
	mu        sync.Mutex
	instances []*instance
	markedBy  map[string]int // marker backend → instance
	marked    chan struct{}  // a marker was handled
}

// instance is one devices service of the harness.
type instance struct {
	id     int
	cancel context.CancelFunc
	stop   func()
	closed bool
}

func newHarness(t *testing.T) *harness {
	t.Helper()
	return newHarnessOn(t, fixture)
}

// newHarnessOn serves devices on a host seeded from a qubes.xml.
func newHarnessOn(t testing.TB, seed string) *harness {
	t.Helper()
	return newHarnessN(t, seed, 1)
}

// newHarnessN serves n devices instances on one host seeded from a qubes.xml.
func newHarnessN(t testing.TB, seed string, n int) *harness {
	t.Helper()
	x := testhost.Start(t, seed)
	h := &harness{Host: x, t: t, life: &fakeLifecycle{}, hv: &fakeHypervisor{devices: []device.Info{
		{Port: device.Port{Backend: "dom0", ID: "00_14.3", Class: "pci"}, DeviceID: "0x8086:0x51f0::p028000",
			Vendor: "Intel Corporation", Product: "WiFi", Interfaces: "p028000", Data: []device.KV{{Key: "sbdf", Value: "0000:00:14.3"}}},
		{Port: device.Port{Backend: "sys-net", ID: "sda", Class: "block"}, DeviceID: ":None", Name: "DT-USB",
			Serial: "Kingston DataTraveler 3.0", Manufacturer: "hosted by sys-net", Interfaces: "b******"},
	}}, markedBy: map[string]int{}, marked: make(chan struct{}, 1)}
	h.clock.Store(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC).Unix())
	for range n {
		h.serve()
	}
	var err error
	if h.js, err = jetstream.New(h.NC); err != nil {
		t.Fatal(err)
	}
	h.events() // skip what start-up stored
	return h
}

// serve starts one more devices instance on a connection of its own.
func (h *harness) serve() *instance {
	h.t.Helper()
	h.mu.Lock()
	in := &instance{id: len(h.instances)}
	h.instances = append(h.instances, in)
	h.mu.Unlock()
	nc := h.Connect()
	s, err := New(Config{Host: h.Subjects, Lifecycle: h.life, Hypervisor: h.hv,
		Now: func() time.Time { return time.Unix(h.clock.Load(), 0) }})
	if err != nil {
		h.t.Fatal(err)
	}
	s.afterTrigger = func(_, vm string) {
		if !strings.HasPrefix(vm, barrierPrefix) {
			return
		}
		h.mu.Lock()
		h.markedBy[vm] = in.id
		h.mu.Unlock()
		select {
		case h.marked <- struct{}{}:
		default:
		}
	}
	ctx, cancel := context.WithCancel(h.Ctx)
	ms, err := s.Serve(ctx, nc)
	if err != nil {
		cancel()
		h.t.Fatal(err)
	}
	in.cancel = cancel
	in.stop = func() {
		cancel()
		<-s.Stopped()
		_ = ms.Stop()
		nc.Close()
	}
	h.t.Cleanup(func() { cancel(); _ = ms.Stop() })
	return in
}

// kill stops an instance as a process that is told to stop: its context ends, its
// watch finishes what it took, its endpoints stop and its connection closes.
func (h *harness) kill(in *instance) {
	h.mu.Lock()
	in.closed = true
	h.mu.Unlock()
	in.stop()
}

// live is the instances that run.
func (h *harness) live() []int {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []int
	for _, in := range h.instances {
		if !in.closed {
			out = append(out, in.id)
		}
	}
	return out
}

func (h *harness) call(method, dest, arg, payload string) string {
	h.t.Helper()
	return h.Wire(method, dest, arg, payload)
}

func (h *harness) events() []string {
	h.t.Helper()
	return h.EventsAfter(&h.seq)
}

func (h *harness) expect(method, dest, arg, payload, want string, events ...string) {
	h.t.Helper()
	if got := h.call(method, dest, arg, payload); got != want {
		h.t.Errorf("%s %s %s %q:\n got %q\nwant %q", method, dest, arg, payload, got, want)
	}
	if got := h.events(); !slices.Equal(got, events) {
		h.t.Errorf("%s %s %s events:\n got %q\nwant %q", method, dest, arg, got, events)
	}
}

func TestFirewall(t *testing.T) {
	h := newHarness(t)
	h.expect("admin.vm.firewall.Get", "work", "", "", "0:action=accept\n")
	h.expect("admin.vm.firewall.Set", "work", "", "action=accept proto=tcp dsthost=qubes-os.org dstports=443\naction=drop\n", "0:",
		"work|firewall-changed|")
	h.expect("admin.vm.firewall.Get", "work", "", "", "0:action=accept dsthost=qubes-os.org proto=tcp dstports=443-443\naction=drop\n")
	// Refused sets change nothing and fire nothing.
	h.expect("admin.vm.firewall.Set", "work", "", "action=accept dsthost=caf\xc3\xa9\n", "2:ProtocolError:Rules contains non-ASCII characters")
	h.expect("admin.vm.firewall.Set", "work", "", "action=allow\n", `2:QubesValueError:line 1: invalid firewall rule: "allow" is not one of accept, drop`)
	h.expect("admin.vm.firewall.Set", "work", "", "action=accept\n\n", "2:QubesValueError:line 2: invalid firewall rule: option \"\" is not key=value")
	h.expect("admin.vm.firewall.Get", "work", "", "", "0:action=accept dsthost=qubes-os.org proto=tcp dstports=443-443\naction=drop\n")
	h.expect("admin.vm.firewall.Reload", "work", "", "", "0:", "work|firewall-changed|")
	// The rules are in the change log: a replica sees the firewall.xml.
	rep := h.Follow(h.Connect())
	bustest.CheckFor(t, 10*time.Second, 10*time.Millisecond, func() error {
		var fw string
		rep.ViewIndexed(func(_ *config.Config, byName func(string) *config.Domain) {
			if d := byName("work"); d != nil {
				fw = d.Firewall
			}
		})
		if !strings.Contains(fw, `<property name="dsthost">qubes-os.org</property>`) {
			return errors.New("firewall.xml of work not in the replica yet")
		}
		return nil
	})
}

func TestFirewallPublishedForNetvm(t *testing.T) {
	h := newHarness(t)
	h.life.set("work", "Running")
	h.life.set("sys-firewall", "Running")
	h.expect("admin.vm.firewall.Set", "work", "", "action=accept specialtarget=dns\naction=drop dst6=fd00::/8\naction=drop\n", "0:",
		"work|firewall-changed|")
	kv, err := h.js.KeyValue(h.Ctx, FirewallBucket)
	if err != nil {
		t.Fatal(err)
	}
	// work's netvm is sys-firewall and its ip 10.137.0.5 (the fixture's defaults).
	want := map[string]string{"policy": "drop", "0000": "action=accept specialtarget=dns", "0002": "action=drop", "": ""}
	for entry, v := range want {
		e, err := kv.Get(h.Ctx, FirewallKey(h.Subjects.ID(), "sys-firewall", "10.137.0.5", entry))
		if err != nil {
			t.Fatalf("entry %q: %v", entry, err)
		}
		if string(e.Value()) != v {
			t.Errorf("entry %q = %q, want %q", entry, e.Value(), v)
		}
	}
	if _, err := kv.Get(h.Ctx, FirewallKey(h.Subjects.ID(), "sys-firewall", "10.137.0.5", "0001")); !errors.Is(err, jetstream.ErrKeyNotFound) {
		t.Errorf("the IPv6 rule is in the IPv4 table: %v", err)
	}
	// Fewer rules: the entries beyond them go (the old entries are removed first).
	h.expect("admin.vm.firewall.Set", "work", "", "action=accept\n", "0:", "work|firewall-changed|")
	if e, err := kv.Get(h.Ctx, FirewallKey(h.Subjects.ID(), "sys-firewall", "10.137.0.5", "0000")); err != nil || string(e.Value()) != "action=accept" {
		t.Errorf("entry 0000 after the second set: %v", err)
	}
	if _, err := kv.Get(h.Ctx, FirewallKey(h.Subjects.ID(), "sys-firewall", "10.137.0.5", "0002")); !errors.Is(err, jetstream.ErrKeyNotFound) {
		t.Errorf("entry 0002 left from the old rules: %v", err)
	}
}

func TestFirewallExpiry(t *testing.T) {
	h := newHarness(t)
	now := h.clock.Load()
	rules := fmt.Sprintf("action=accept expire=%d\naction=drop\n", now+60)
	h.expect("admin.vm.firewall.Set", "work", "", rules, "0:", "work|firewall-changed|")
	h.expect("admin.vm.firewall.Get", "work", "", "", fmt.Sprintf("0:action=accept expire=%d\naction=drop\n", now+60))
	h.clock.Store(now + 61)
	// Get leaves the expired rule out at once; the expiry loop saves the rules
	// without it and fires firewall-changed, as qubesd's expiry timer does.
	h.expect("admin.vm.firewall.Get", "work", "", "", "0:action=drop\n")
	var evs []string
	bustest.CheckFor(t, 10*time.Second, 20*time.Millisecond, func() error {
		evs = append(evs, h.events()...)
		if !slices.Equal(evs, []string{"work|firewall-changed|"}) {
			return fmt.Errorf("events %q", evs)
		}
		return nil
	})
}

func TestDeviceAssignments(t *testing.T) {
	h := newHarness(t)
	qarg := "dom0+00_14.3+0x8086+0x51f0++p028000"
	payload := "device_id='0x8086:0x51f0::p028000' port_id='00_14.3' devclass='pci' backend_domain='dom0' mode='required' frontend_domain='sys-net'"
	h.expect("admin.vm.device.pci.Assign", "sys-net", qarg, payload, "0:",
		"sys-net|device-pre-assign:pci|device=dom0:00_14.3:0x8086:0x51f0::p028000,options={}",
		"sys-net|device-assign:pci|device=dom0:00_14.3:0x8086:0x51f0::p028000,options={}")
	h.expect("admin.vm.device.pci.Assign", "sys-net", qarg, payload,
		"2:DeviceAlreadyAssigned:'pci device dom0:00_14.3:0x8086:0x51f0::p028000 already assigned to sys-net'")
	h.expect("admin.vm.device.pci.Assigned", "sys-net", "", "",
		"0:dom0+00_14.3:0x8086:0x51f0::p028000 device_id='0x8086:0x51f0::p028000' port_id='00_14.3' devclass='pci' backend_domain='dom0' mode='required' frontend_domain='sys-net'\n")
	h.expect("admin.vm.device.pci.Set.assignment", "sys-net", qarg, "auto-attach", "0:",
		"sys-net|device-pre-assign:pci|device=dom0:00_14.3:0x8086:0x51f0::p028000,options={}",
		"sys-net|device-assignment-changed:pci|device=dom0:00_14.3:0x8086:0x51f0::p028000")
	h.expect("admin.vm.device.pci.Set.assignment", "sys-net", qarg, "auto-attach", "0:")
	h.expect("admin.vm.device.pci.Assign", "work", qarg, strings.Replace(payload, "required", "manual", 1),
		"2:QubesValueError:Only auto-attachable devices can be assigned.")
	h.expect("admin.vm.device.pci.Unassign", "sys-net", qarg, "", "0:",
		"sys-net|device-unassign:pci|device=dom0:00_14.3:0x8086:0x51f0::p028000")
	h.expect("admin.vm.device.pci.Unassign", "sys-net", qarg, "",
		"2:DeviceNotAssigned:'pci device dom0:00_14.3:0x8086:0x51f0::p028000 not assigned to sys-net'")
	h.expect("admin.vm.device.pci.Assign", "work", "dom0", payload, "abort")
	h.expect("admin.vm.device.pci.Assign", "work", "nosuchvm+00_14.3", payload, "abort")
}

func TestBlockAttachDetach(t *testing.T) {
	h := newHarness(t)
	qarg := "sys-net+sda++None"
	attach := "device_id=':None' port_id='sda' devclass='block' backend_domain='sys-net' mode='manual' frontend_domain='work' _read-only='yes'"
	h.expect("admin.vm.device.block.Attach", "work", qarg, attach,
		"2:QubesVMNotRunningError:VM not running, cannot attach device, do you mean `assign`?")
	h.life.set("work", "Running")
	h.expect("admin.vm.device.block.Attach", "work", qarg, attach, "0:",
		"work|device-pre-attach:block|device=sys-net:sda::None,options={'read-only': 'yes'}",
		"work|device-attach:block|device=sys-net:sda::None,options={'read-only': 'yes', 'frontend-dev': 'xvdi'}")
	h.expect("admin.vm.device.block.Attached", "work", "", "",
		"0:sys-net+sda::None device_id=':None' port_id='sda' devclass='block' backend_domain='sys-net' mode='manual' frontend_domain='work' _read-only='yes' _frontend-dev='xvdi'\n")
	h.expect("admin.vm.device.block.Available", "sys-net", "sda", "",
		"0:sda::None device_id=':None' port_id='sda' devclass='block' backend_domain='sys-net' name='DT-USB' serial='Kingston DataTraveler 3.0' manufacturer='hosted by sys-net' attachment='work' interfaces='b******'\n")
	h.life.set("personal", "Running")
	h.expect("admin.vm.device.block.Attach", "personal", qarg, "",
		"2:DeviceAlreadyAttached:'Device sys-net:sda::None already attached to work'",
		"personal|device-pre-attach:block|device=sys-net:sda::None,options={}")
	h.expect("admin.vm.device.block.Attach", "work", "sys-net+sdz", "", "2:ProtocolError:Cannot attach ambiguous block device.")
	h.expect("admin.vm.device.block.Detach", "work", qarg, "", "0:",
		"work|device-pre-detach:block|port=sys-net:sda", "work|device-detach:block|port=sys-net:sda")
	h.expect("admin.vm.device.block.Detach", "work", qarg, "", "2:DeviceNotAssigned:'block device sda not attached to work'")
	h.expect("admin.vm.device.block.Attach", "work", qarg, "_read-only='maybe'",
		"2:QubesValueError:Invalid literal for boolean property: 'maybe'",
		"work|device-pre-attach:block|device=sys-net:sda::None,options={'read-only': 'maybe'}")
	h.expect("admin.vm.device.pci.Attach", "work", "dom0+00_14.3", "",
		"2:QubesException:Can't attach PCI device to VM in pvh mode",
		"work|device-pre-attach:pci|device=dom0:00_14.3:0x8086:0x51f0::p028000,options={}")
}

func TestDeniedInterfaces(t *testing.T) {
	h := newHarness(t)
	h.expect("admin.vm.device.denied.Add", "work", "", "u03****b******", "0:",
		"work|property-pre-set:devices_denied|name=devices_denied,newvalue=b******u03****,oldvalue=",
		"work|property-set:devices_denied|name=devices_denied,newvalue=b******u03****,oldvalue=")
	h.expect("admin.vm.device.denied.List", "work", "", "", "0:b******\nu03****")
	h.expect("admin.vm.device.denied.Add", "work", "", "b******b******", "2:ProtocolError:Duplicated device interfaces in payload.")
	h.expect("admin.vm.device.denied.Add", "work", "", "zzz", "2:QubesValueError:Invalid length of interfaces='zzz' (is 3, expected multiple of 7)")
	h.expect("admin.vm.device.denied.Remove", "work", "", "p******", "0:")
	h.expect("admin.vm.device.denied.Remove", "work", "", "all", "0:",
		"work|property-pre-set:devices_denied|name=devices_denied,newvalue=,oldvalue=b******u03****",
		"work|property-set:devices_denied|name=devices_denied,newvalue=,oldvalue=b******u03****")
	h.expect("admin.vm.device.denied.List", "work", "", "", "0:")
}
