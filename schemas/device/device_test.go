package device

import (
	"errors"
	"testing"
)

func TestParseQarg(t *testing.T) {
	tests := []struct {
		name, arg    string
		wantErr      bool
		backend      string
		port, device string
	}{
		{name: "pci", arg: "dom0+00_14.3+0x8086+0x51f0++p028000", backend: "dom0", port: "00_14.3", device: "0x8086:0x51f0::p028000"},
		{name: "block", arg: "sys-net+sda++None", backend: "sys-net", port: "sda", device: ":None"},
		{name: "port only", arg: "sys-net+sda", backend: "sys-net", port: "sda", device: "*"},
		{name: "any port", arg: "sys-net+_+x", backend: "sys-net", port: "*", device: "x"},
		{name: "any backend", arg: "_+sda", backend: "*", port: "sda", device: "*"},
		{name: "unknown interface", arg: "dom0+00_14.3+0x8086+0x51f0++_______", backend: "dom0", port: "00_14.3", device: "0x8086:0x51f0::?******"},
		{name: "bad chars kept for the payload check", arg: "dom0+00_1f.3!", backend: "dom0", port: "00_1f.3!", device: "*"},
		{name: "no plus", arg: "dom0", wantErr: true},
		{name: "empty", arg: "", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, err := ParseQarg(tt.arg, "pci")
			if tt.wantErr {
				if !errors.Is(err, ErrQarg) {
					t.Fatalf("ParseQarg(%q) = %+v, %v; want ErrQarg", tt.arg, a, err)
				}
				return
			}
			if err != nil || a.Backend != tt.backend || a.Port.ID != tt.port || a.DeviceID != tt.device {
				t.Fatalf("ParseQarg(%q) = %+v, %v", tt.arg, a, err)
			}
		})
	}
}

func TestParseAssignment(t *testing.T) {
	pciDev, _ := ParseQarg("dom0+00_1f.3+0x8086+0x51c8++p040380", "pci")
	tests := []struct {
		name, payload string
		want          string // serialization, or "error: <text>"
	}{
		{"full", "device_id='0x8086:0x51c8::p040380' port_id='00_1f.3' devclass='pci' backend_domain='dom0' mode='required' frontend_domain='work'",
			"device_id='0x8086:0x51c8::p040380' port_id='00_1f.3' devclass='pci' backend_domain='dom0' mode='required' frontend_domain='work'"},
		{"empty is manual", "", "device_id='0x8086:0x51c8::p040380' port_id='00_1f.3' devclass='pci' backend_domain='dom0' mode='manual'"},
		{"options", "mode='auto-attach' _read-only='yes' _x='a\\'b'",
			"device_id='0x8086:0x51c8::p040380' port_id='00_1f.3' devclass='pci' backend_domain='dom0' mode='auto-attach' _read-only='yes' _x='a\\'b'"},
		{"bad mode", "mode='sometimes'", "error: 'sometimes' is not a valid AssignmentMode"},
		{"garbage", "garbage", "error: DeviceAssignment.__init__() got an unexpected keyword argument 'garbage'"},
		{"unknown key before bad mode", "mode='x' color='red'", "error: DeviceAssignment.__init__() got an unexpected keyword argument 'color'"},
		{"other port", "port_id='00_1f.4'", "error: Got device from port: 00_1f.4 when expected port: 00_1f.3."},
		{"other backend", "backend_domain='sys-usb'", "error: Got device exposed by sys-usbwhen expected devices from dom0."},
		{"other class", "devclass='block'", "error: Got block device when expected pci."},
		{"other identity", "device_id='x'", "error: Unrecognized device identity 'x' expected '0x8086:0x51c8::p040380'"},
		{"non-ascii", "mode='required' _x='\xc3\xa9'", "error: 'ascii' codec can't decode byte 0xc3 in position 20: ordinal not in range(128)"},
		{"bad key chars", "mo de='x'", "error: Invalid chars in property name: {' '}"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, err := ParseAssignment([]byte(tt.payload), pciDev)
			got := ""
			if err != nil {
				var pe *ProtocolError
				if !errors.As(err, &pe) {
					t.Fatalf("error %v is not a ProtocolError", err)
				}
				got = "error: " + pe.Msg
			} else {
				got = a.Serialize()
			}
			if got != tt.want {
				t.Fatalf("ParseAssignment(%q)\n got %q\nwant %q", tt.payload, got, tt.want)
			}
		})
	}
}

func TestInfoSerialize(t *testing.T) {
	pci := Info{Port: Port{Backend: "dom0", ID: "00_14.3", Class: "pci"}, DeviceID: "0x8086:0x51f0::p028000",
		Vendor: "Intel Corporation", Product: "Alder Lake-P PCH CNVi WiFi", Interfaces: "p028000", Data: []KV{{"sbdf", "0000:00:14.3"}}}
	want := "device_id='0x8086:0x51f0::p028000' port_id='00_14.3' devclass='pci' backend_domain='dom0' vendor='Intel Corporation' product='Alder Lake-P PCH CNVi WiFi' interfaces='p028000' _sbdf='0000:00:14.3'"
	if got := pci.Serialize(); got != want {
		t.Errorf("pci\n got %q\nwant %q", got, want)
	}
	unknown := Info{Port: Port{Backend: "sys-usb", ID: "1-1", Class: "usb"}}
	want = "device_id='0000:0000::?******' port_id='1-1' devclass='usb' backend_domain='sys-usb'  interfaces='?******'"
	if got := unknown.Serialize(); got != want {
		t.Errorf("unknown\n got %q\nwant %q", got, want)
	}
}

func TestDevicesXML(t *testing.T) {
	as := []Assignment{
		{Port: Port{Backend: "dom0", ID: "00_14.3", Class: "pci"}, DeviceID: "0x8086:0x51f0::p028000", Mode: ModeRequired},
		{Port: Port{Backend: "sys-net", ID: "sda", Class: "pci"}, DeviceID: ":None", Mode: ModeAuto, Options: []KV{{"read-only", "yes"}}},
	}
	el := MarshalDevices("pci", as)
	want := `<devices class="pci">
  <device backend-domain="dom0" id="00_14.3" mode="required" identity="0x8086:0x51f0::p028000"/>
  <device backend-domain="sys-net" id="sda" mode="auto-attach" identity=":None">
    <option name="read-only">yes</option>
  </device>
</devices>`
	if string(el) != want {
		t.Fatalf("MarshalDevices =\n%s\nwant\n%s", el, want)
	}
	class, back, err := UnmarshalDevices(el, "work")
	if err != nil || class != "pci" || len(back) != 2 || back[1].Options[0] != (KV{"read-only", "yes"}) || back[0].Frontend != "work" {
		t.Fatalf("UnmarshalDevices = %q %+v %v", class, back, err)
	}
	if string(MarshalDevices("block", nil)) != `<devices class="block"/>` {
		t.Errorf("empty: %q", MarshalDevices("block", nil))
	}
	_, legacy, _ := UnmarshalDevices(`<devices class="pci"><device backend-domain="dom0" id="00_02.0" required="no"/></devices>`, "x")
	if len(legacy) != 1 || legacy[0].Mode != ModeAuto || legacy[0].DeviceID != Any {
		t.Errorf("legacy = %+v", legacy)
	}
}
