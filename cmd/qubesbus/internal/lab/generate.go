// Package lab runs many simulated Qubes hosts on one NATS (a test lab), and makes the
// qubes.xml each of them starts from.
package lab

import (
	"crypto/sha256"
	"fmt"
	"strconv"

	"github.com/qubesbus/qubesbus/schemas/config"
)

// Generate returns seed plus extra AppVMs scale-0001, scale-0002, … based on the
// seed's default template, shaped like the ones real qubesd wrote in qubes-1000.xml.
// UUIDs derive from host and index, so a lab is reproducible.
func Generate(seed *config.Config, hostID string, extra int) (*config.Config, error) {
	c := seed.Clone()
	maxQID := 0
	template := ""
	for _, p := range c.Properties {
		if p.Name == "default_template" {
			template = p.Value
		}
	}
	for i := range c.Domains {
		if q, ok := c.Domains[i].Property("qid"); ok {
			if n, err := strconv.Atoi(q); err == nil && n > maxQID {
				maxQID = n
			}
		}
	}
	if template == "" {
		return nil, fmt.Errorf("seed has no default_template")
	}
	if maxQID+extra > 9999 {
		return nil, fmt.Errorf("%d qubes do not fit qids 1…9999", extra)
	}
	for i := 0; i < extra; i++ {
		name := fmt.Sprintf("scale-%04d", i+1)
		qid := strconv.Itoa(maxQID + 1 + i)
		d := config.Domain{
			ID:    "domain-" + qid,
			Class: "AppVM",
			Properties: []config.Property{
				{Name: "label", Value: "gray"}, {Name: "name", Value: name}, {Name: "qid", Value: qid},
				{Name: "uuid", Value: uuidFor(hostID, name)}, {Name: "template", Value: template},
			},
			Tags:         []string{"audiovm-dom0", "guivm-dom0"},
			VolumeConfig: config.RawXML(volumeConfig(name, template)),
		}
		c.Domains = append(c.Domains, d)
	}
	if err := c.CheckInvariants(); err != nil {
		return nil, err
	}
	return c, nil
}

func uuidFor(host, name string) string {
	h := sha256.Sum256([]byte(host + "/" + name))
	h[6] = h[6]&0x0f | 0x40 // version 4 layout
	h[8] = h[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", h[0:4], h[4:6], h[6:8], h[8:10], h[10:16])
}

func volumeConfig(name, template string) string {
	return `<volume-config>
  <volume name="root" pool="varlibqubes" vid="appvms/` + name + `/root" revisions_to_keep="1" rw="True" save_on_stop="False" snap_on_start="True" size="10737418240" source="vm-templates/` + template + `/root"/>
  <volume name="private" pool="varlibqubes" vid="appvms/` + name + `/private" revisions_to_keep="1" rw="True" save_on_stop="True" snap_on_start="False" size="2147483648"/>
  <volume name="volatile" pool="varlibqubes" vid="appvms/` + name + `/volatile" revisions_to_keep="1" rw="True" save_on_stop="False" snap_on_start="False" size="10737418240"/>
  <volume name="kernel" pool="linux-kernel" vid="6.12.40-1.fc41" revisions_to_keep="0" rw="False" save_on_stop="False" snap_on_start="False"/>
</volume-config>`
}
