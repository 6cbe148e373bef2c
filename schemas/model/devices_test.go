package model

import (
	"testing"

	"github.com/qubesbus/qubesbus/schemas/config"
)

// A qube that backs a device another qube has assigned cannot be removed: qubesd's
// domain-pre-delete handler names the assignments' port ids.
func TestRemoveRefusedWhileProvidingDevices(t *testing.T) {
	c := loadFixture(t)
	m := New(c, DefaultHost, nil)
	work := m.Domain("work")
	work.Devices = config.SetDevicesElement(work.Devices, "block",
		config.RawXML(`<devices class="block"><device backend-domain="personal" id="sdb" mode="auto-attach" identity="*"/></devices>`))
	ch, err := m.Remove(m.Domain("personal"))
	if err != nil {
		t.Fatal(err)
	}
	if got, want := errText(ch.Err), "QubesVMInUseError: VM has devices assigned to other VMs: sdb"; got != want {
		t.Errorf("Remove personal: %q, want %q", got, want)
	}
	if len(ch.Pre) != 1 || ch.Pre[0].Name != "domain-pre-delete" || len(ch.Ops) != 0 {
		t.Errorf("Remove personal: pre %v ops %v, want only domain-pre-delete", ch.Pre, ch.Ops)
	}
}

// A disposable starts with its base's firewall (qubesd's firewall.clone).
func TestCreateDisposableCopiesFirewall(t *testing.T) {
	c := loadFixture(t)
	m := New(c, DefaultHost, nil)
	base := m.Ref(Holder{D: m.Domain("work")}, "default_dispvm")
	if base == nil {
		t.Skip("work has no default_dispvm in the fixture")
	}
	const fw = `<firewall version="2"><rules><rule><properties><property name="action">drop</property></properties></rule></rules></firewall>`
	base.Firewall = fw
	ch, err := m.CreateDisposable(DisposableRequest{Source: "work", Dest: "dom0", UUID: "7d8c1d62-0000-4000-8000-000000000001"})
	if err != nil {
		t.Fatal(err)
	}
	var d *config.Domain
	for _, op := range ch.Ops {
		if op.Kind == config.OpAddDomain {
			d = op.New
		}
	}
	if d == nil || d.Firewall != fw {
		t.Fatalf("the disposable's firewall: %+v", d)
	}
}
