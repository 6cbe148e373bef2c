package system

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/qubesbus/qubesbus/bus/bustest"
)

// TestStartWithMissingImage: a qube whose image was deleted does not start, as
// qubesd's file-reflink driver refuses it at Storage.verify (recorded on the
// oracle): right after domain-pre-start, before domain-verify-files and before its
// netvm starts, StoragePoolException names the image and the volume; for a
// snap_on_start volume the image is its template's.
func TestStartWithMissingImage(t *testing.T) {
	sys := startSystem(t)
	evs := captureLifeEvents(t, sys, "test")
	images := filepath.Join(sys.cfg.DataDir, "storage", "var", "lib", "qubes")
	ok := func(got string) {
		t.Helper()
		if got != "0\x00" {
			t.Fatalf("call failed: %q", got)
		}
	}
	// Once started and stopped, personal and its template have images.
	ok(call(t, sys, "admin.vm.Start", "personal", "", ""))
	ok(call(t, sys, "admin.vm.Shutdown", "personal", "force+wait", ""))
	// The storage commits its private volume after the domain-shutdown.
	bustest.CheckFor(t, 10*time.Second, 5*time.Millisecond, func() error {
		if _, err := os.Stat(filepath.Join(images, "appvms/personal/private-dirty.img")); err == nil {
			return errors.New("private volume of personal not committed yet")
		}
		return nil
	})
	for _, tc := range []struct{ image, vm, msg string }{
		{"appvms/personal/private.img", "personal",
			"Missing image file '/var/lib/qubes/appvms/personal/private.img' for volume appvms/personal/private"},
		{"vm-templates/fedora-41/root.img", "personal",
			"Missing image file '/var/lib/qubes/vm-templates/fedora-41/root.img' for volume appvms/personal/root"},
	} {
		if err := os.Rename(filepath.Join(images, tc.image), filepath.Join(images, tc.image+".aside")); err != nil {
			t.Fatal(err)
		}
		mark := evs.mark(t)
		if got, want := call(t, sys, "admin.vm.Start", tc.vm, "", ""), "2\x00StoragePoolException\x00\x00"+tc.msg+"\x00"; got != want {
			t.Errorf("start without %s:\n got %q\nwant %q", tc.image, got, want)
		}
		want := []string{
			"1\x00" + tc.vm + "\x00domain-pre-start\x00start_guid\x00True\x00mem_required\x00None\x00\x00",
			"1\x00" + tc.vm + "\x00domain-start-failed\x00reason\x00" + tc.msg + "\x00\x00",
		}
		if got := evs.settled(t, mark); !slices.Equal(got, want) {
			t.Errorf("events:\n got %q\nwant %q", got, want)
		}
		if err := os.Rename(filepath.Join(images, tc.image+".aside"), filepath.Join(images, tc.image)); err != nil {
			t.Fatal(err)
		}
	}
	ok(call(t, sys, "admin.vm.Start", "personal", "", ""))
}
