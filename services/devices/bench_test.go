package devices

import (
	"testing"

	"github.com/qubesbus/qubesbus/bus/envelope"
)

// BenchmarkScale: firewall Get and Set and PCI Available of one qube, on the
// fixture's 9 qubes and on 1 009; each should cost the same at both sizes.
func BenchmarkScale(b *testing.B) {
	for _, fx := range []struct{ name, seed string }{
		{"qubes=9", fixture},
		{"qubes=1009", "../../testdata/qubes-1000.xml"},
	} {
		h := newHarnessOn(b, fx.seed)
		for _, c := range []struct{ name, method, payload string }{
			{"firewall.Get", "admin.vm.firewall.Get", ""},
			{"firewall.Set", "admin.vm.firewall.Set", "action=accept proto=tcp dstports=443\naction=drop\n"},
			{"pci.Available", "admin.vm.device.pci.Available", ""},
		} {
			b.Run(fx.name+"/"+c.name, func(b *testing.B) {
				for b.Loop() {
					var payload []byte
					if c.payload != "" {
						payload = []byte(c.payload)
					}
					dest := "work"
					if c.method == "admin.vm.device.pci.Available" {
						dest = "dom0"
					}
					if rep := h.Call("", c.method, dest, "", payload); rep.Status != envelope.StatusOK {
						b.Fatalf("%s: %+v", c.method, rep)
					}
				}
			})
		}
	}
}
