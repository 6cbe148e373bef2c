package system

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/qubesbus/qubesbus/bus"
)

// qubes.xml follows the reply to a change, in the background (the change is durable
// in the change log before the reply), and ends up holding it; reads write nothing.
func TestQubesXMLSavedAfterTheReply(t *testing.T) {
	sys := startSystem(t)
	file := filepath.Join(filepath.Dir(sys.Socket), "data", "qubes.xml")
	writes := sys.Store.Metrics().Writes
	for i := 0; i < 20; i++ {
		roundTrip(t, sys.Socket, []byte("admin.vm.property.Get+label dom0 name work\x00"))
	}
	if n := sys.Store.Metrics().Writes; n != writes {
		t.Fatalf("reads wrote qubes.xml %d times", n-writes)
	}
	if got := roundTrip(t, sys.Socket, []byte("admin.vm.property.Set+label dom0 name work\x00red")); string(got) != "0\x00" {
		t.Fatalf("set: %q", got)
	}
	if m := sys.Store.Metrics(); m.Synced < m.Revision || m.Syncs == 0 {
		t.Fatalf("the change log was not synced before the reply: %+v", m)
	}
	waitWritten(t, sys)
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(b, []byte(`<property name="label">red</property>`)) {
		t.Fatal("qubes.xml does not hold the new label")
	}
}

// Storage and devices changes take the same path as properties': durable in the
// change log before the reply, in qubes.xml after it.
func TestStorageAndDevicesSavedAfterTheReply(t *testing.T) {
	sys := startSystem(t)
	file := filepath.Join(filepath.Dir(sys.Socket), "data", "qubes.xml")
	for _, tc := range []struct{ req, want string }{
		{"admin.pool.Add+lvm_thin dom0 name dom0\x00name=thin\nvolume_group=qubes_dom0\nthin_pool=vm-pool", `name="thin"`},
		{"admin.vm.device.denied.Add dom0 name work\x00u03****", `<property name="devices_denied">u03****</property>`},
	} {
		if got := roundTrip(t, sys.Socket, []byte(tc.req)); string(got) != "0\x00" {
			t.Fatalf("%q: %q", tc.req, got)
		}
		if m := sys.Store.Metrics(); m.Synced < m.Revision {
			t.Fatalf("%q: the change log was not synced before the reply: %+v", tc.req, m)
		}
		waitWritten(t, sys)
		b, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Contains(b, []byte(tc.want)) {
			t.Fatalf("%q: qubes.xml does not hold %s", tc.req, tc.want)
		}
	}
}

// waitWritten returns once qubes.xml holds the store's current revision (written in
// the background after the replies).
func waitWritten(t *testing.T, sys *System) {
	t.Helper()
	rev := sys.Store.Revision()
	for sys.Store.Metrics().Written < rev {
		if err := bus.Sleep(t.Context(), time.Millisecond); err != nil {
			t.Fatalf("qubes.xml at revision %d, waiting for %d: %v", sys.Store.Metrics().Written, rev, err)
		}
	}
}
