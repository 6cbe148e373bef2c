// Package device is qubesd's device model as the Admin API shows it
// (qubes/device_protocol.py): ports, device information, assignments, their text
// serialisation, the qrexec argument form of a device, interface codes, and the
// <devices class=…> element of qubes.xml that keeps a qube's assignments. Pure: no I/O.
package device

import (
	"fmt"
	"strings"
)

// Classes are the device classes, in the order qubesd's registry lists them
// (admin.deviceclass.List as recorded).
var Classes = []string{"block", "pci"}

// KnownClass reports whether class is a device class.
func KnownClass(class string) bool {
	for _, c := range Classes {
		if c == class {
			return true
		}
	}
	return false
}

// Assignment modes.
const (
	ModeManual   = "manual"
	ModeAsk      = "ask-to-attach"
	ModeAuto     = "auto-attach"
	ModeRequired = "required"
)

// ValidMode reports whether m is an assignment mode.
func ValidMode(m string) bool {
	switch m {
	case ModeManual, ModeAsk, ModeAuto, ModeRequired:
		return true
	}
	return false
}

// Any stands for any port or any device id.
const Any = "*"

// Port is where a device sits: a backend qube, a port id unique there, a class.
type Port struct {
	Backend string `json:"backend"`
	ID      string `json:"port_id"`
	Class   string `json:"devclass"`
}

// String is qubesd's str(Port): backend:port_id.
func (p Port) String() string { return p.Backend + ":" + p.ID }

// KV is one ordered key and value (device extra data, assignment options).
type KV struct {
	Key   string `json:"key"`
	Value string `json:"value"`
}

// Info is a device as its backend exposes it (qubesd's DeviceInfo). Empty strings
// are unknown.
type Info struct {
	Port
	DeviceID     string `json:"device_id"`
	Vendor       string `json:"vendor,omitempty"`
	Product      string `json:"product,omitempty"`
	Manufacturer string `json:"manufacturer,omitempty"`
	Name         string `json:"name,omitempty"`
	Serial       string `json:"serial,omitempty"`
	// Interfaces are the concatenated 7-character interface codes (e.g. "p028000").
	Interfaces string `json:"interfaces,omitempty"`
	// Attachment is the qube the device is attached to ("" none).
	Attachment  string `json:"attachment,omitempty"`
	ParentPort  string `json:"parent_port_id,omitempty"`
	ParentClass string `json:"parent_devclass,omitempty"`
	Data        []KV   `json:"data,omitempty"`
	// Mode is a block device's mode, "w" or "r" ("" is "w").
	Mode string `json:"mode,omitempty"`
}

// unknownInterface is qubesd's DeviceInterface.unknown().
const unknownInterface = "?******"

// Identity is the device id qubesd uses: the given one, or 0000:0000::?****** when none.
func (i Info) Identity() string {
	if i.DeviceID == "" {
		return "0000:0000::" + unknownInterface
	}
	return i.DeviceID
}

// String is qubesd's str(device): backend:port_id:device_id.
func (i Info) String() string { return i.Port.String() + ":" + i.Identity() }

// Key is the Available line's key: port_id:device_id.
func (i Info) Key() string { return i.Port.ID + ":" + i.Identity() }

// pack is qubesd's DeviceSerializer.pack_property.
func pack(b *strings.Builder, key, value string) {
	b.WriteString(key)
	b.WriteString("='")
	b.WriteString(strings.ReplaceAll(value, "'", `\'`))
	b.WriteByte('\'')
}

func orUnknown(s string) string {
	if s == "" {
		return "unknown"
	}
	return s
}

// Serialize is qubesd's DeviceInfo.serialize. The descriptive attributes come from
// a Python set in qubesd, so their order depends on its hash seed; this order (vendor,
// product, name, serial, manufacturer) is one the recorded daemon's order agrees with
// for both PCI (vendor, product) and block devices (name, serial, manufacturer).
func (i Info) Serialize() string {
	var b strings.Builder
	pack(&b, "device_id", i.Identity())
	b.WriteByte(' ')
	pack(&b, "port_id", i.Port.ID)
	b.WriteByte(' ')
	pack(&b, "devclass", i.Class)
	b.WriteByte(' ')
	pack(&b, "backend_domain", i.Backend)
	var attrs []string
	for _, kv := range [][2]string{{"vendor", i.Vendor}, {"product", i.Product}, {"name", i.Name},
		{"serial", i.Serial}, {"manufacturer", i.Manufacturer}} {
		if orUnknown(kv[1]) != "unknown" {
			var a strings.Builder
			pack(&a, kv[0], kv[1])
			attrs = append(attrs, a.String())
		}
	}
	b.WriteByte(' ')
	b.WriteString(strings.Join(attrs, " "))
	if i.Attachment != "" {
		b.WriteByte(' ')
		pack(&b, "attachment", i.Attachment)
	}
	b.WriteByte(' ')
	ifc := i.Interfaces
	if ifc == "" {
		ifc = unknownInterface
	}
	pack(&b, "interfaces", ifc)
	if i.ParentPort != "" {
		b.WriteByte(' ')
		pack(&b, "parent_port_id", i.ParentPort)
		b.WriteByte(' ')
		pack(&b, "parent_devclass", i.ParentClass)
	}
	for _, kv := range i.Data {
		b.WriteByte(' ')
		pack(&b, "_"+kv.Key, kv.Value)
	}
	return b.String()
}

// Assignment is a device given to a frontend qube: persistently (assigned, in
// qubes.xml) or for now (attached, mode manual).
type Assignment struct {
	Port
	DeviceID string `json:"device_id"` // Any for any device on the port
	Mode     string `json:"mode"`
	Frontend string `json:"frontend,omitempty"`
	Options  []KV   `json:"options,omitempty"`
}

// Virtual is qubesd's str(VirtualDevice): backend:port_id:device_id.
func (a Assignment) Virtual() string { return a.Port.String() + ":" + a.DeviceID }

// Key is the Assigned/Attached line's key: backend+port_id:device_id.
func (a Assignment) Key() string { return a.Backend + "+" + a.Port.ID + ":" + a.DeviceID }

// Serialize is qubesd's DeviceAssignment.serialize.
func (a Assignment) Serialize() string {
	var b strings.Builder
	pack(&b, "device_id", a.DeviceID)
	b.WriteByte(' ')
	pack(&b, "port_id", a.Port.ID)
	b.WriteByte(' ')
	pack(&b, "devclass", a.Class)
	b.WriteByte(' ')
	pack(&b, "backend_domain", a.Backend)
	b.WriteByte(' ')
	pack(&b, "mode", a.Mode)
	if a.Frontend != "" {
		b.WriteByte(' ')
		pack(&b, "frontend_domain", a.Frontend)
	}
	for _, kv := range a.Options {
		b.WriteByte(' ')
		pack(&b, "_"+kv.Key, kv.Value)
	}
	return b.String()
}

// OptionsRepr is the options as qubesd's event kwargs print a dict: {'k': 'v', …}.
func OptionsRepr(opts []KV) string {
	var b strings.Builder
	b.WriteByte('{')
	for i, kv := range opts {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(pyRepr(kv.Key))
		b.WriteString(": ")
		b.WriteString(pyRepr(kv.Value))
	}
	b.WriteByte('}')
	return b.String()
}

// pyRepr is Python's repr of an ASCII str.
func pyRepr(s string) string {
	q := byte('\'')
	if strings.Contains(s, "'") && !strings.Contains(s, `"`) {
		q = '"'
	}
	var b strings.Builder
	b.WriteByte(q)
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '\\':
			b.WriteString(`\\`)
		case c == q:
			b.WriteByte('\\')
			b.WriteByte(c)
		case c == '\n':
			b.WriteString(`\n`)
		case c == '\r':
			b.WriteString(`\r`)
		case c == '\t':
			b.WriteString(`\t`)
		case c < 0x20 || c >= 0x7f:
			fmt.Fprintf(&b, `\x%02x`, c)
		default:
			b.WriteByte(c)
		}
	}
	b.WriteByte(q)
	return b.String()
}

// Option returns the value of an option.
func Option(opts []KV, key string) (string, bool) {
	for _, kv := range opts {
		if kv.Key == key {
			return kv.Value, true
		}
	}
	return "", false
}

// SetOption sets an option, keeping the place of an existing one.
func SetOption(opts []KV, key, value string) []KV {
	out := append([]KV(nil), opts...)
	for i := range out {
		if out[i].Key == key {
			out[i].Value = value
			return out
		}
	}
	return append(out, KV{key, value})
}
