package simdriver

import (
	"context"
	"errors"
	"testing"

	"github.com/qubesbus/qubesbus/schemas/device"
	"github.com/qubesbus/qubesbus/schemas/hostdev"
	"github.com/qubesbus/qubesbus/services/vmlifecycle"
)

func ports(inv hostdev.Inventory) map[string]string {
	out := map[string]string{}
	for _, d := range inv.Devices {
		out[d.Port.String()] = d.Attachment
	}
	return out
}

// TestDevicesFollowBackends: the reference host's PCI devices are always there; a
// backend's block devices come and go with it, and a stopped frontend or backend
// takes its attachments along; hot-plugged devices appear and unplugged ones go.
func TestDevicesFollowBackends(t *testing.T) {
	ctx := context.Background()
	h := New(Config{ShutdownLatency: -1})
	inv, _ := h.Devices(ctx)
	if got := ports(inv); len(got) != 3 || got["dom0:00_14.3"] != "" {
		t.Fatalf("devices of a fresh host: %v", got)
	}
	for _, vm := range []string{"sys-net", "work"} {
		if _, err := h.Create(ctx, vmlifecycle.DomainSpec{Name: vm, MemoryMiB: 400, MaxMemMiB: 400, VCPUs: 1}); err != nil {
			t.Fatal(err)
		}
	}
	inv, _ = h.Devices(ctx)
	sda, ok := inv.Find("block", "sys-net", "sda")
	if !ok || sda.Identity() != ":None" || sda.Name != "DT-USB" || sda.Serial != "Kingston DataTraveler 3.0" {
		t.Fatalf("sda of a running sys-net: %+v, %v", sda, ok)
	}
	at := hostdev.Attachment{Port: sda.Port, Frontend: "work", Options: []device.KV{{Key: "read-only", Value: "yes"}}}
	if err := h.AttachDevice(ctx, at); err != nil {
		t.Fatal(err)
	}
	if err := h.AttachDevice(ctx, hostdev.Attachment{Port: sda.Port, Frontend: "sys-net"}); !errors.Is(err, hostdev.ErrAttached) {
		t.Fatalf("second attach: %v", err)
	}
	if err := h.AttachDevice(ctx, hostdev.Attachment{Port: sda.Port, Frontend: "personal"}); !errors.Is(err, hostdev.ErrFrontendStopped) {
		t.Fatalf("attach to a halted qube: %v", err)
	}
	inv, _ = h.Devices(ctx)
	if ports(inv)["sys-net:sda"] != "work" {
		t.Fatalf("attachment not shown: %v", ports(inv))
	}
	// A crash of the backend takes its devices and their attachments away.
	if err := h.Crash("sys-net"); err != nil {
		t.Fatal(err)
	}
	inv, _ = h.Devices(ctx)
	if _, ok := inv.Find("block", "sys-net", "sda"); ok || len(inv.Attached) != 0 {
		t.Fatalf("after the backend crashed: %+v", inv)
	}
	// Hot-plug and unplug.
	usb := BlockDevice("dom0", "sdb1", "Stick (LABEL)", 1<<30, "r")
	h.Plug(usb)
	inv, _ = h.Devices(ctx)
	got, ok := inv.Find("block", "dom0", "sdb1")
	if !ok || got.Identity() != ":1" || got.Name != "LABEL" || got.Mode != "r" {
		t.Fatalf("plugged device: %+v, %v", got, ok)
	}
	if err := h.Unplug(usb.Port); err != nil {
		t.Fatal(err)
	}
	if err := h.Unplug(usb.Port); !errors.Is(err, hostdev.ErrNoDevice) {
		t.Fatalf("second unplug: %v", err)
	}
}
