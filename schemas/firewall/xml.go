package firewall

import (
	"bytes"
	"encoding/xml"
	"fmt"
	"strings"
)

// Marshal writes rules as qubesd's firewall.xml (version 2), byte for byte as lxml
// pretty-prints it: each rule's set properties in qubesd's property order (order,
// then name: action, comment, expire, dsthost, proto, specialtarget, dstports,
// icmptype). qubesd leaves out rules that have expired when it saves; so does the
// caller, by passing only the live ones.
func Marshal(rules []Rule) []byte {
	var b bytes.Buffer
	b.WriteString("<firewall version=\"2\">\n")
	if len(rules) == 0 {
		b.WriteString("  <rules/>\n")
	} else {
		b.WriteString("  <rules>\n")
		for _, r := range rules {
			b.WriteString("    <rule>\n      <properties>\n")
			for _, f := range r.xmlFields() {
				fmt.Fprintf(&b, "        <property name=%q>", f.key)
				_ = xml.EscapeText(&b, []byte(f.value))
				b.WriteString("</property>\n")
			}
			b.WriteString("      </properties>\n    </rule>\n")
		}
		b.WriteString("  </rules>\n")
	}
	b.WriteString("</firewall>\n")
	return b.Bytes()
}

func (r Rule) xmlFields() []field {
	var out []field
	add := func(k, v string) {
		if v != "" {
			out = append(out, field{k, v})
		}
	}
	add("action", r.Action)
	add("comment", r.Comment)
	add("expire", r.Expire)
	if r.Dst != "" || r.DstType != "" {
		out = append(out, field{"dsthost", r.Dst})
	}
	add("proto", r.Proto)
	add("specialtarget", r.SpecialTarget)
	add("dstports", r.DstPorts)
	add("icmptype", r.ICMPType)
	return out
}

type xmlFirewall struct {
	XMLName xml.Name `xml:"firewall"`
	Version string   `xml:"version,attr"`
	Rules   *struct {
		Rule []struct {
			Props []struct {
				Name  string `xml:"name,attr"`
				Value string `xml:",chardata"`
			} `xml:"properties>property"`
		} `xml:"rule"`
	} `xml:"rules"`
}

// Unmarshal reads a firewall.xml of version 2, checking every rule as qubesd does
// when it loads one.
func Unmarshal(data []byte) ([]Rule, error) {
	var doc xmlFirewall
	if err := xml.Unmarshal(data, &doc); err != nil {
		return nil, fmt.Errorf("firewall.xml: %w", err)
	}
	if doc.Version != "2" {
		return nil, fmt.Errorf("unsupported firewall.xml version: %q", doc.Version)
	}
	if doc.Rules == nil {
		return nil, fmt.Errorf("firewall.xml: no rules element")
	}
	rules := []Rule{}
	for i, xr := range doc.Rules.Rule {
		var opts []string
		comment := ""
		for _, p := range xr.Props {
			switch p.Name {
			case "comment":
				comment = p.Value
				continue
			case "action", "proto", "dsthost", "dstports", "icmptype", "specialtarget", "expire":
			default:
				continue // qubesd ignores properties it does not know
			}
			if strings.ContainsAny(p.Value, " \t\r\n") {
				return nil, fmt.Errorf("firewall.xml rule %d: %w: space in %s", i, ErrInvalid, p.Name)
			}
			opts = append(opts, p.Name+"="+p.Value)
		}
		line := strings.Join(opts, " ")
		if comment != "" {
			line += " comment=" + comment
		}
		r, err := Parse(line)
		if err != nil {
			return nil, fmt.Errorf("firewall.xml rule %d: %w", i, err)
		}
		rules = append(rules, r)
	}
	return rules, nil
}
