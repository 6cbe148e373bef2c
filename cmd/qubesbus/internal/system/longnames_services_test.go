package system

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// dropWatch is a log handler that keeps the messages a connection's line guard
// dropped (bus: "nats message dropped …"): a subject built from a client's name that
// went over the NATS protocol line limit.
type dropWatch struct {
	mu      sync.Mutex
	dropped []string
}

func (d *dropWatch) Enabled(context.Context, slog.Level) bool { return true }
func (d *dropWatch) Handle(_ context.Context, r slog.Record) error {
	if strings.Contains(r.Message, "dropped") {
		d.mu.Lock()
		d.dropped = append(d.dropped, r.Message)
		d.mu.Unlock()
	}
	return nil
}
func (d *dropWatch) WithAttrs([]slog.Attr) slog.Handler { return d }
func (d *dropWatch) WithGroup(string) slog.Handler      { return d }

func (d *dropWatch) drops() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]string(nil), d.dropped...)
}

// TestLongNamesOfEveryService: names of 60 KiB (the request limit is 64 KiB) in the
// calls of every service, not only tags and features: property names and values, pool
// names (a pool's volumes are keyed by it), volume names, device ports and ids,
// firewall rules, denied device interfaces, backup profile names, qube and method
// names. Each is answered as qubesd answers it, no message is dropped for an
// over-long subject, every connection stays up, and the daemon serves on.
func TestLongNamesOfEveryService(t *testing.T) {
	var root string
	profiles := t.TempDir()
	watch := &dropWatch{}
	dir := t.TempDir()
	cfg := Config{
		Socket: filepath.Join(dir, "qubesd.sock"), DataDir: filepath.Join(dir, "data"),
		QubesXML: filepath.Join(repoTestdata, "qubes.xml"), HostID: "test", NATSPort: -1,
		BackupProfiles: profiles,
	}
	storageRoot(t, &root)(&cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	sys, err := Start(ctx, cfg, slog.New(watch))
	if err != nil {
		t.Fatalf("start system: %v", err)
	}
	t.Cleanup(func() {
		if err := sys.Stop(); err != nil {
			t.Errorf("stop: %v", err)
		}
	})

	const size = 60 << 10
	long := strings.Repeat("n", size)
	half := strings.Repeat("h", 30000) // where a request carries the name twice
	host := strings.Repeat("a", size-100)
	var ifaces strings.Builder // 56 000 bytes of distinct valid interfaces
	for i := range 8000 {
		fmt.Fprintf(&ifaces, "u%06x", i)
	}
	iface := ifaces.String()
	value := strings.Repeat("v", size-100)
	calls := []struct{ req, want string }{
		// Property names (qubesd: property_list()), and a long property value.
		{"admin.vm.property.Get+" + long + " dom0 name work\x00", "2\x00QubesNoSuchPropertyError\x00\x00Invalid property '" + long + "' of work\x00"},
		{"admin.vm.property.Set+" + long + " dom0 name work\x00x", "2\x00QubesNoSuchPropertyError\x00\x00Invalid property '" + long + "' of work\x00"},
		{"admin.vm.property.Set+default_user dom0 name work\x00" + value, "0\x00"},
		{"admin.vm.property.Get+default_user dom0 name work\x00", "0\x00default=False type=str " + value},
		// Volume names (enforce_arg: PermissionDenied).
		{"admin.vm.volume.Info+" + long + " dom0 name work\x00", "2\x00PermissionDenied\x00\x00Argument not in 'work volumes'\x00"},
		{"admin.vm.volume.Resize+" + long + " dom0 name work\x001", "2\x00PermissionDenied\x00\x00Argument not in 'work volumes'\x00"},
		// Pool names: qubesd sets no limit. A simulated pool's volumes are keyed by it.
		{"admin.pool.Info+" + long + " dom0 name dom0\x00", "2\x00PermissionDenied\x00\x00Argument not in 'pools'\x00"},
		{"admin.pool.Add+lvm_thin dom0 name dom0\x00name=" + long + "\nvolume_group=vg\nthin_pool=tp", "0\x00"},
		{"admin.vm.CreateInPool.AppVM+fedora-41 dom0 name dom0\x00name=longpool label=red pool=" + long, "0\x00"},
		{"admin.vm.volume.Resize+private dom0 name longpool\x004294967296", "0\x00"},
		{"admin.vm.Start+ dom0 name longpool\x00", "0\x00"},
		{"admin.vm.Kill+ dom0 name longpool\x00", "0\x00"},
		{"admin.vm.Remove+ dom0 name longpool\x00", "0\x00"},
		{"admin.pool.Remove+" + long + " dom0 name dom0\x00", "0\x00"},
		// Device ports and ids: assigned, listed and unassigned as given.
		{"admin.vm.device.pci.Available+" + long + " dom0 name dom0\x00", "0\x00"},
		{"admin.vm.device.pci.Assign+dom0+" + half + "+0x8086+0x51f0++p028000 dom0 name work\x00device_id='0x8086:0x51f0::p028000' port_id='" + half + "' devclass='pci' backend_domain='dom0' mode='required' frontend_domain='work'", "0\x00"},
		{"admin.vm.device.pci.Assigned+ dom0 name work\x00", "0\x00dom0+" + half + ":0x8086:0x51f0::p028000 device_id='0x8086:0x51f0::p028000' port_id='" + half + "' devclass='pci' backend_domain='dom0' mode='required' frontend_domain='work'\n"},
		{"admin.vm.device.pci.Unassign+dom0+" + half + "+0x8086+0x51f0++p028000 dom0 name work\x00", "0\x00"},
		{"admin.vm.device.pci.Detach+dom0+" + long + ":* dom0 name work\x00", "2\x00DeviceNotAssigned\x00\x00'pci device " + long + " not attached to work'\x00"},
		{"admin.vm.device.denied.Add+ dom0 name work\x00" + iface, "0\x00"},
		{"admin.vm.device.denied.Remove+ dom0 name work\x00all", "0\x00"},
		// Firewall rules: a long host name and a long comment, written while the
		// netvm runs (its QubesDB table, a key-value bucket).
		{"admin.vm.Start+ dom0 name sys-firewall\x00", "0\x00"},
		{"admin.vm.firewall.Set+ dom0 name work\x00action=accept dsthost=" + host + "\naction=drop\n", "0\x00"},
		{"admin.vm.firewall.Get+ dom0 name work\x00", "0\x00action=accept dsthost=" + host + "\naction=drop\n"},
		{"admin.vm.firewall.Set+ dom0 name work\x00action=accept comment=" + host + "\n", "0\x00"},
		{"admin.vm.firewall.Reload+ dom0 name work\x00", "0\x00"},
		// Backup profile names: os.path.exists is false for a name too long for the
		// filesystem.
		{"admin.backup.Info+" + long + " dom0 name dom0\x00", "2\x00QubesBackupProfileNotFoundError\x00\x00Backup profile does not exist: " + long + "\x00"},
		{"admin.backup.Execute+" + long + " dom0 name dom0\x00", "2\x00QubesBackupProfileNotFoundError\x00\x00Backup profile does not exist: " + long + "\x00"},
		{"admin.backup.Cancel+" + long + " dom0 name dom0\x00", "2\x00QubesException\x00\x00Backup operation not running\x00"},
		// Qube and method names.
		{"admin.vm.property.Get+label dom0 name " + long + "\x00", "2\x00QubesVMNotFoundError\x00\x00No such domain: '" + long + "'\x00"},
		{"admin." + long + " dom0 name dom0\x00", "2\x00ProtocolError\x00\x00no such method: 'admin." + long + "'\x00"},
	}
	for _, c := range calls {
		if len(c.req) > 64<<10 {
			t.Fatalf("request of %d bytes is over the gateway's limit", len(c.req))
		}
		start := time.Now()
		got := roundTrip(t, sys.Socket, []byte(c.req))
		if string(got) != c.want {
			t.Errorf("%s (%v):\n got %s\nwant %s", brief([]byte(c.req[:min(len(c.req), 48)])), time.Since(start).Round(time.Millisecond), brief(got), brief([]byte(c.want)))
		}
	}
	if d := watch.drops(); len(d) > 0 {
		t.Errorf("messages dropped for an over-long subject: %q", d)
	}
	for _, nc := range sys.Conns() {
		if !nc.IsConnected() || nc.LastError() != nil {
			t.Errorf("%s: connected %v, last error %v", nc.Opts.Name, nc.IsConnected(), nc.LastError())
		}
	}
	rctx, rcancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer rcancel()
	for _, c := range sys.Ready(rctx) {
		if !c.OK {
			t.Errorf("not ready: %s %s", c.Name, c.Detail)
		}
	}
	// The daemon still serves, reads and changes alike, through every service.
	if got := roundTrip(t, sys.Socket, []byte(listAll)); !bytes.HasPrefix(got, []byte("0\x00dom0 class=AdminVM")) {
		t.Fatalf("admin.vm.List after long names: %s", brief(got))
	}
	if err := os.WriteFile(filepath.Join(profiles, "p.conf"), []byte("destination_vm: dom0\ndestination_path: /nonexistent\ninclude: [work]\npassphrase_text: x\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ req, want string }{
		{"admin.vm.tag.Set+after dom0 name personal\x00", "0\x00"},
		{"admin.pool.List+ dom0 name dom0\x00", "0\x00varlibqubes\nlinux-kernel\n"},
		{"admin.vm.device.pci.Assigned+ dom0 name work\x00", "0\x00"},
		{"admin.vm.firewall.Get+ dom0 name work\x00", "0\x00action=accept comment=" + host + "\n"},
		{"admin.backup.Info+p dom0 name dom0\x00", "0\x00"},
	} {
		if got := roundTrip(t, sys.Socket, []byte(c.req)); !strings.HasPrefix(string(got), c.want) {
			t.Errorf("after long names, %s: %s, want %s…", brief([]byte(c.req)), brief(got), brief([]byte(c.want)))
		}
	}
}
