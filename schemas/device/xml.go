package device

import (
	"encoding/xml"
	"fmt"
	"strings"

	"github.com/qubesbus/qubesbus/schemas/config"
)

// MarshalDevices writes a qube's assignments of one class as the <devices class=…>
// element of qubes.xml, as qubesd writes it (kept verbatim in config.Domain.Devices).
func MarshalDevices(class string, as []Assignment) config.RawXML {
	var b strings.Builder
	if len(as) == 0 {
		fmt.Fprintf(&b, `<devices class="%s"/>`, attr(class))
		return config.RawXML(b.String())
	}
	fmt.Fprintf(&b, "<devices class=\"%s\">\n", attr(class))
	for _, a := range as {
		fmt.Fprintf(&b, `  <device backend-domain="%s" id="%s" mode="%s" identity="%s"`,
			attr(a.Backend), attr(a.Port.ID), attr(a.Mode), attr(a.DeviceID))
		if len(a.Options) == 0 {
			b.WriteString("/>\n")
			continue
		}
		b.WriteString(">\n")
		for _, o := range a.Options {
			fmt.Fprintf(&b, "    <option name=\"%s\">%s</option>\n", attr(o.Key), text(o.Value))
		}
		b.WriteString("  </device>\n")
	}
	b.WriteString("</devices>")
	return config.RawXML(b.String())
}

func text(s string) string {
	return strings.NewReplacer("&", "&amp;", "<", "&lt;", ">", "&gt;", "\r", "&#13;").Replace(s)
}

func attr(s string) string {
	return strings.NewReplacer("&", "&amp;", "<", "&lt;", ">", "&gt;", `"`, "&quot;", "\n", "&#10;", "\t", "&#9;", "\r", "&#13;").Replace(s)
}

type xmlDevices struct {
	Class   string `xml:"class,attr"`
	Devices []struct {
		Backend  string  `xml:"backend-domain,attr"`
		ID       *string `xml:"id,attr"`
		Mode     string  `xml:"mode,attr"`
		Required string  `xml:"required,attr"`
		Identity *string `xml:"identity,attr"`
		Options  []struct {
			Name  string `xml:"name,attr"`
			Value string `xml:",chardata"`
		} `xml:"option"`
	} `xml:"device"`
}

// UnmarshalDevices reads a <devices class=…> element as qubesd loads it: mode
// defaults to required (legacy required="no" is auto-attach), id and identity to "*",
// an "identity" option overrides the attribute. Assignments of manual mode are
// dropped (qubesd keeps only auto-attachable ones).
func UnmarshalDevices(el config.RawXML, frontend string) (class string, as []Assignment, err error) {
	var d xmlDevices
	if err := xml.Unmarshal([]byte(el), &d); err != nil {
		return "", nil, fmt.Errorf("devices element: %w", err)
	}
	for _, x := range d.Devices {
		a := Assignment{Port: Port{Backend: x.Backend, ID: Any, Class: d.Class}, DeviceID: Any, Mode: x.Mode, Frontend: frontend}
		if x.ID != nil {
			a.Port.ID = *x.ID
		}
		if x.Identity != nil {
			a.DeviceID = *x.Identity
		}
		if a.Mode == "" {
			a.Mode = ModeRequired
			if x.Required == "no" {
				a.Mode = ModeAuto
			}
		}
		for _, o := range x.Options {
			if o.Name == "identity" {
				a.DeviceID = o.Value
				continue
			}
			a.Options = append(a.Options, KV{o.Name, o.Value})
		}
		if !ValidMode(a.Mode) || a.Mode == ModeManual {
			continue
		}
		as = append(as, a)
	}
	return d.Class, as, nil
}

// Assigned returns a qube's assignments of one class from its configuration.
func Assigned(d *config.Domain, class string) []Assignment {
	for _, el := range d.Devices {
		if config.DevicesClass(el) != class {
			continue
		}
		_, as, err := UnmarshalDevices(el, d.Name())
		if err != nil {
			return nil
		}
		return as
	}
	return nil
}
