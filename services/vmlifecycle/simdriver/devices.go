package simdriver

import (
	"context"
	"fmt"
	"slices"
	"strconv"

	"github.com/qubesbus/qubesbus/schemas/device"
	"github.com/qubesbus/qubesbus/schemas/hostdev"
)

// DefaultPCIDevices are the host PCI devices of the recorded reference host
// (testdata/README): a USB controller, a network controller and an audio device of
// dom0, as qubesd's PCI extension describes them (names from pci.ids).
func DefaultPCIDevices() []device.Info {
	pci := func(port, sbdf, vendorID, productID, class, product string) device.Info {
		return device.Info{Port: device.Port{Backend: "dom0", ID: port, Class: "pci"},
			DeviceID: vendorID + ":" + productID + "::p" + class, Vendor: "Intel Corporation", Product: product,
			Interfaces: "p" + class, Data: []device.KV{{Key: "sbdf", Value: sbdf}}}
	}
	return []device.Info{
		pci("00_0d.0", "0000:00:0d.0", "0x8086", "0x461e", "0c0340", "Alder Lake-P Thunderbolt 4 USB Controller"),
		pci("00_14.3", "0000:00:14.3", "0x8086", "0x51f0", "028000", "Alder Lake-P PCH CNVi WiFi"),
		pci("00_1f.3", "0000:00:1f.3", "0x8086", "0x51c8", "040380", "Alder Lake PCH-P High Definition Audio Controller"),
	}
}

// BlockDevice is a block device as a backend qube's QubesDB describes it under
// /qubes-block-devices/<port>/ (desc "model (label)", size, mode), turned into what
// qubesd's block extension shows.
func BlockDevice(backend, port, desc string, size int64, mode string) device.Info {
	info := device.Info{Port: device.Port{Backend: backend, ID: port, Class: "block"},
		DeviceID: ":" + partition(port), Manufacturer: "hosted by " + backend, Interfaces: "b******", Mode: mode}
	model, label, _ := cutSpace(desc)
	if model != "" {
		info.Serial = trimSpaces(replaceUnderscores(model))
	}
	if len(label) > 2 {
		info.Name = trimSpaces(replaceUnderscores(label[1 : len(label)-1]))
	}
	return info
}

// DefaultBlockDevices are the block devices of the reference host: sda of sys-net
// (while it runs).
func DefaultBlockDevices() []device.Info {
	return []device.Info{BlockDevice("sys-net", "sda", "Kingston_DataTraveler_3.0 (DT-USB)", 16<<30, "w")}
}

// partition is qubesd's partition number of a block port ("sda1" → "1"), "None" if
// the port does not end in digits.
func partition(port string) string {
	i := len(port)
	for i > 0 && port[i-1] >= '0' && port[i-1] <= '9' {
		i--
	}
	if i == len(port) {
		return "None"
	}
	n := port[i:]
	for len(n) > 1 && n[0] == '0' {
		n = n[1:]
	}
	return n
}

func cutSpace(s string) (string, string, bool) {
	for i := 0; i < len(s); i++ {
		if s[i] == ' ' {
			return s[:i], s[i+1:], true
		}
	}
	return s, "", false
}

func replaceUnderscores(s string) string {
	b := []byte(s)
	for i := range b {
		if b[i] == '_' {
			b[i] = ' '
		}
	}
	return string(b)
}

func trimSpaces(s string) string {
	for len(s) > 0 && s[0] == ' ' {
		s = s[1:]
	}
	for len(s) > 0 && s[len(s)-1] == ' ' {
		s = s[:len(s)-1]
	}
	return s
}

// hostDevices is the device state of the simulated host: what each backend has
// (exposed only while the backend runs; dom0 always runs) and what is attached where.
type hostDevices struct {
	all      []device.Info
	attached []hostdev.Attachment
	// onChange are told the backend whose devices a Plug or Unplug changed.
	onChange []func(backend string)
}

// OnDeviceChange registers f, called (outside the hypervisor's lock) with the backend
// after each hot-plug or unplug: what qubesd learns from the backend's QubesDB watch.
// A backend's devices that come and go with it are not reported here: the domain's
// start and stop are.
func (h *Hypervisor) OnDeviceChange(f func(backend string)) {
	h.lock()
	defer h.mu.Unlock()
	h.devices.onChange = append(h.devices.onChange, f)
}

func (h *Hypervisor) deviceChanged(backend string) {
	h.lock()
	fs := slices.Clone(h.devices.onChange)
	h.mu.Unlock()
	for _, f := range fs {
		f(backend)
	}
}

func (h *Hypervisor) runningLocked(name string) bool {
	if name == "dom0" {
		return true
	}
	d := h.domains[name]
	return d != nil && !d.crashed
}

// Devices returns what every running backend exposes and what is attached.
func (h *Hypervisor) Devices(context.Context) (hostdev.Inventory, error) {
	h.lock()
	defer h.mu.Unlock()
	inv := hostdev.Inventory{Attached: slices.Clone(h.devices.attached), Boot: strconv.FormatInt(h.boot.UnixNano(), 10)}
	for _, d := range h.devices.all {
		if !h.runningLocked(d.Backend) {
			continue
		}
		for _, a := range h.devices.attached {
			if a.Port == d.Port {
				d.Attachment = a.Frontend
			}
		}
		inv.Devices = append(inv.Devices, d)
	}
	return inv, nil
}

// AttachDevice attaches an exposed device to a running frontend.
func (h *Hypervisor) AttachDevice(_ context.Context, a hostdev.Attachment) error {
	h.lock()
	defer h.mu.Unlock()
	if !h.runningLocked(a.Frontend) {
		return fmt.Errorf("%w: %s", hostdev.ErrFrontendStopped, a.Frontend)
	}
	if !h.exposedLocked(a.Port) {
		return fmt.Errorf("%w: %s", hostdev.ErrNoDevice, a.Port)
	}
	for _, x := range h.devices.attached {
		if x.Port == a.Port {
			return fmt.Errorf("%w: %s to %s", hostdev.ErrAttached, a.Port, x.Frontend)
		}
	}
	h.devices.attached = append(h.devices.attached, a)
	return nil
}

// DetachDevice detaches a device from its frontend.
func (h *Hypervisor) DetachDevice(_ context.Context, a hostdev.Attachment) error {
	h.lock()
	defer h.mu.Unlock()
	for i, x := range h.devices.attached {
		if x.Port == a.Port && x.Frontend == a.Frontend {
			h.devices.attached = slices.Delete(h.devices.attached, i, i+1)
			return nil
		}
	}
	return fmt.Errorf("%w: %s from %s", hostdev.ErrNotAttached, a.Port, a.Frontend)
}

func (h *Hypervisor) exposedLocked(p device.Port) bool {
	if !h.runningLocked(p.Backend) {
		return false
	}
	for _, d := range h.devices.all {
		if d.Port == p {
			return true
		}
	}
	return false
}

// Plug adds a device to its backend (a hot-plug; replaces one at the same port).
func (h *Hypervisor) Plug(info device.Info) {
	h.lock()
	h.devices.all = slices.DeleteFunc(h.devices.all, func(d device.Info) bool { return d.Port == info.Port })
	h.devices.all = append(h.devices.all, info)
	h.mu.Unlock()
	h.deviceChanged(info.Backend)
}

// Unplug removes a device from its backend; an attachment of it goes too.
func (h *Hypervisor) Unplug(p device.Port) error {
	h.lock()
	n := len(h.devices.all)
	h.devices.all = slices.DeleteFunc(h.devices.all, func(d device.Info) bool { return d.Port == p })
	if len(h.devices.all) == n {
		h.mu.Unlock()
		return fmt.Errorf("%w: %s", hostdev.ErrNoDevice, p)
	}
	h.devices.attached = slices.DeleteFunc(h.devices.attached, func(a hostdev.Attachment) bool { return a.Port == p })
	h.mu.Unlock()
	h.deviceChanged(p.Backend)
	return nil
}

// dropDevicesLocked forgets the attachments of a domain that stopped, as frontend or
// as backend.
func (h *Hypervisor) dropDevicesLocked(name string) {
	h.devices.attached = slices.DeleteFunc(h.devices.attached, func(a hostdev.Attachment) bool {
		return a.Frontend == name || a.Backend == name
	})
}
