package system

import (
	"os"
	"path/filepath"
	"testing"
)

// TestPolicy: dom0 may call anything; other sources only what a rule allows, else
// PermissionDenied as qubesd answers a refused admin-permission check.
func TestPolicy(t *testing.T) {
	dir := t.TempDir()
	pf := filepath.Join(dir, "policy")
	rules := "admin.vm.List * work @adminvm allow\n" +
		"admin.vm.property.Get +label @anyvm @type:AppVM allow\n" +
		"admin.vm.property.Get * personal @anyvm deny\n"
	if err := os.WriteFile(pf, []byte(rules), 0o644); err != nil {
		t.Fatal(err)
	}
	sys := startSystem(t, func(c *Config) { c.PolicyFile = pf })
	denied := "2\x00PermissionDenied\x00\x00\x00"
	cases := []struct{ name, req, want string }{
		{"dom0 allowed by default", "admin.vm.property.Get+netvm dom0 name work\x00", "0\x00default=False type=vm sys-firewall"},
		{"rule allows", "admin.vm.property.Get+label work name personal\x00", "0\x00default=False type=label yellow"},
		{"argument not covered", "admin.vm.property.Get+netvm work name work\x00", denied},
		{"target class not covered", "admin.vm.property.Get+label work name fedora-41\x00", denied},
		{"explicit deny before default", "admin.vm.property.Get+netvm personal name work\x00", denied},
		{"default deny", "admin.vm.Start+ work name work\x00", denied},
		{"unknown source still not found first", "admin.vm.List+ nosuch name dom0\x00", "2\x00QubesVMNotFoundError\x00\x00No such domain: 'nosuch'\x00"},
		{"checks before policy", "admin.vm.List+x work name dom0\x00", "2\x00ProtocolError\x00\x00unexpected argument\x00"},
		{"events denied too", "admin.Events+ work name dom0\x00", denied},
	}
	for _, c := range cases {
		if got := roundTrip(t, sys.Socket, []byte(c.req)); string(got) != c.want {
			t.Errorf("%s: got %q, want %q", c.name, got, c.want)
		}
	}
	// work may list (dest dom0 only, by the rule).
	if got := roundTrip(t, sys.Socket, []byte("admin.vm.List+ work name dom0\x00")); len(got) < 10 || string(got[:6]) != "0\x00dom0" {
		t.Errorf("allowed list: %.40q", got)
	}
}
