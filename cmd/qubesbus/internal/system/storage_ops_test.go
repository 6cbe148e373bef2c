package system

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/access"
	storageapi "github.com/qubesbus/qubesbus/schemas/storage"
	"github.com/qubesbus/qubesbus/services/vmlifecycle/simdriver"
)

// storageRoot runs the host's file pools under a temporary root and returns it.
func storageRoot(t *testing.T, root *string) func(*Config) {
	*root = filepath.Join(t.TempDir(), "root")
	return func(c *Config) {
		stamp := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
		c.Storage = StorageHost{Root: *root, Stamp: &stamp,
			StatFS: func(string) (int64, int64, error) { return 100 << 30, 20 << 30, nil }}
	}
}

func wantReply(t *testing.T, sys *System, req, want string) {
	t.Helper()
	if got := roundTrip(t, sys.Socket, []byte(req)); string(got) != want {
		t.Fatalf("%q:\n got %q\nwant %q", req, got, want)
	}
}

// sizeOf is a file's apparent size, -1 if it is missing.
func sizeOf(path string) int64 {
	st, err := os.Stat(path)
	if err != nil {
		return -1
	}
	return st.Size()
}

// A created qube's volumes exist in its pool with qubesd's sizes (only the ones it
// keeps data of: a StandaloneVM's root and private, an AppVM's private), a start
// prepares them before the domain runs, a stop commits them, and the removal takes
// every file of the qube, revisions included, and its directory.
func TestStorageVolumesFollowCreateStartRemove(t *testing.T) {
	var root string
	sys := startSystem(t, storageRoot(t, &root))
	appvms := filepath.Join(root, "var/lib/qubes/appvms")

	wantReply(t, sys, "admin.vm.Create.StandaloneVM+ dom0 name dom0\x00name=sa label=red", "0\x00")
	wantReply(t, sys, "admin.vm.Create.AppVM+fedora-41 dom0 name dom0\x00name=app label=red", "0\x00")
	for _, f := range []struct {
		path string
		size int64
	}{
		{"sa/root.img", 10 << 30}, {"sa/private.img", 2 << 30}, {"sa/volatile-dirty.img", -1},
		{"app/private.img", 2 << 30}, {"app/root.img", -1},
	} {
		if got := sizeOf(filepath.Join(appvms, f.path)); got != f.size {
			t.Errorf("%s: size %d after create, want %d", f.path, got, f.size)
		}
	}

	// Start prepares (the running copies exist once the start answers), a stop
	// commits a revision.
	wantReply(t, sys, "admin.vm.Start+ dom0 name app\x00", "0\x00")
	for _, f := range []string{"app/private-dirty.img", "app/root-dirty.img", "app/volatile-dirty.img"} {
		if sizeOf(filepath.Join(appvms, f)) < 0 {
			t.Errorf("%s missing while app runs", f)
		}
	}
	wantReply(t, sys, "admin.vm.Kill+ dom0 name app\x00", "0\x00")
	wantReply(t, sys, "admin.vm.volume.ListSnapshots+private dom0 name app\x00", "0\x001\n")

	wantReply(t, sys, "admin.vm.Remove+ dom0 name app\x00", "0\x00")
	wantReply(t, sys, "admin.vm.Remove+ dom0 name sa\x00", "0\x00")
	for _, d := range []string{"app", "sa"} {
		if ents, err := os.ReadDir(filepath.Join(appvms, d)); err == nil {
			t.Errorf("appvms/%s still there after the removal: %v", d, ents)
		}
	}
	// A new qube of a removed one's name starts from empty volumes.
	wantReply(t, sys, "admin.vm.Create.AppVM+fedora-41 dom0 name dom0\x00name=app label=red", "0\x00")
	wantReply(t, sys, "admin.vm.volume.ListSnapshots+private dom0 name app\x00", "0\x00")
}

// A create whose volumes cannot be made (a full pool) fails with the storage's error,
// as qubesd's create_on_disk does: the qube is deleted again (its events say so), and
// no volume of it is left in any pool.
func TestStorageCreateInFullPoolLeavesNothing(t *testing.T) {
	var root string
	sys := startSystem(t, storageRoot(t, &root))
	lab := storageapi.LabClient{NC: connectAs(t, sys, access.Lab), Host: subject.ForHost("test")}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	wantReply(t, sys, "admin.pool.Add+lvm_thin dom0 name dom0\x00name=thin\nvolume_group=qubes_dom0\nthin_pool=vm-pool", "0\x00")
	if err := lab.SetFaults(ctx, "thin", storageapi.LabFaultSpec{Full: true}); err != nil {
		t.Fatal(err)
	}
	ev := openEvents(t, sys.Socket, "dom0")
	wantReply(t, sys, "admin.vm.CreateInPool.StandaloneVM+ dom0 name dom0\x00name=full label=red pool:private=thin",
		"2\x00StoragePoolException\x00\x00  Cannot create new thin volume, free space in thin pool qubes_dom0/vm-pool reached threshold.\x00")
	var names []string
	for len(names) == 0 || names[len(names)-1] != "domain-delete" {
		frame, err := ev.next(5 * time.Second)
		if err != nil {
			t.Fatalf("events %v, then %v", names, err)
		}
		names = append(names, strings.Split(string(frame), "\x00")[2])
	}
	want := "domain-add domain-tag-add:created-by-dom0 domain-pre-delete domain-delete"
	if got := strings.Join(names, " "); got != want {
		t.Errorf("events %q, want %q", got, want)
	}
	if got := roundTrip(t, sys.Socket, []byte("admin.vm.List+ dom0 name full\x00")); !strings.Contains(string(got), "QubesVMNotFoundError") {
		t.Errorf("the qube exists after its failed create: %q", got)
	}
	// The root was made in varlibqubes before the private failed: it is gone again.
	if _, err := os.Stat(filepath.Join(root, "var/lib/qubes/appvms/full")); err == nil {
		t.Error("appvms/full left behind by the failed create")
	}
	wantReply(t, sys, "admin.pool.volume.List+thin dom0 name dom0\x00", "0\x00")

	// Cleared, the same create succeeds.
	if err := lab.SetFaults(ctx, "thin", storageapi.LabFaultSpec{}); err != nil {
		t.Fatal(err)
	}
	wantReply(t, sys, "admin.vm.CreateInPool.StandaloneVM+ dom0 name dom0\x00name=full label=red pool:private=thin", "0\x00")
	wantReply(t, sys, "admin.pool.volume.List+thin dom0 name dom0\x00", "0\x00appvms/full/private\n")
}

// A start whose volumes cannot be prepared fails with the storage's error after
// domain-start-failed, as qubesd's start does when Storage.start raises; no domain is
// created and the volumes this start prepared are as before (the root's running copy
// in varlibqubes is gone again). Cleared, the same start succeeds.
func TestStorageStartInFullPoolLeavesNothing(t *testing.T) {
	var root string
	sys := startSystem(t, storageRoot(t, &root))
	host := subject.ForHost("test")
	labNC := connectAs(t, sys, access.Lab)
	lab := storageapi.LabClient{NC: labNC, Host: host}
	hv := simdriver.LabClient{NC: labNC, Host: host}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	wantReply(t, sys, "admin.pool.Add+lvm_thin dom0 name dom0\x00name=thin\nvolume_group=qubes_dom0\nthin_pool=vm-pool", "0\x00")
	wantReply(t, sys, "admin.vm.CreateInPool.StandaloneVM+ dom0 name dom0\x00name=sa label=red pool:private=thin", "0\x00")
	wantReply(t, sys, "admin.vm.property.Set+netvm dom0 name sa\x00", "0\x00")
	if err := lab.SetFaults(ctx, "thin", storageapi.LabFaultSpec{Full: true}); err != nil {
		t.Fatal(err)
	}
	ev := openEvents(t, sys.Socket, "sa")
	wantReply(t, sys, "admin.vm.Start+ dom0 name sa\x00",
		"2\x00StoragePoolException\x00\x00  Cannot create new thin volume, free space in thin pool qubes_dom0/vm-pool reached threshold.\x00")
	var frames []string
	for len(frames) == 0 || !strings.Contains(frames[len(frames)-1], "domain-start-failed") {
		frame, err := ev.next(5 * time.Second)
		if err != nil {
			t.Fatalf("events %q, then %v", frames, err)
		}
		frames = append(frames, string(frame))
	}
	want := []string{"1\x00sa\x00domain-pre-start\x00start_guid\x00True\x00mem_required\x00None\x00\x00",
		"1\x00sa\x00domain-verify-files\x00\x00",
		"1\x00sa\x00domain-start-failed\x00reason\x00  Cannot create new thin volume, free space in thin pool qubes_dom0/vm-pool reached threshold.\x00\x00"}
	if strings.Join(frames, "|") != strings.Join(want, "|") {
		t.Errorf("events\n%q\nwant\n%q", frames, want)
	}
	doms, err := hv.Domains(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range doms {
		if d.Name == "sa" {
			t.Fatal("a domain of sa exists after its failed start")
		}
	}
	if sizeOf(filepath.Join(root, "var/lib/qubes/appvms/sa/root-dirty.img")) >= 0 {
		t.Error("the root's running copy is left after the failed start")
	}
	wantReply(t, sys, "admin.vm.CurrentState+ dom0 name sa\x00", "0\x00mem=0 mem_static_max=0 cputime=0 power_state=Halted")

	if err := lab.SetFaults(ctx, "thin", storageapi.LabFaultSpec{}); err != nil {
		t.Fatal(err)
	}
	wantReply(t, sys, "admin.vm.Start+ dom0 name sa\x00", "0\x00")
	wantReply(t, sys, "admin.vm.Kill+ dom0 name sa\x00", "0\x00")
}

// qubesd refuses to snapshot a source volume whose snapshots are disabled
// (revisions_to_keep=-1) while its qube runs. Storage.start would say "Volume <vid>
// is running", but in a file-reflink pool Storage.verify comes first and finds the
// source's committed image gone (the running qube's start renamed it to its dirty
// image): "Missing image file …" (as the oracle answers).
func TestStorageStartRefusesRunningSourceWithoutSnapshots(t *testing.T) {
	var root string
	sys := startSystem(t, storageRoot(t, &root))
	wantReply(t, sys, "admin.vm.volume.Set.revisions_to_keep+root dom0 name fedora-41\x00-1", "0\x00")
	wantReply(t, sys, "admin.vm.property.Set+netvm dom0 name fedora-41\x00", "0\x00")
	wantReply(t, sys, "admin.vm.Create.AppVM+fedora-41 dom0 name dom0\x00name=app label=red", "0\x00")
	wantReply(t, sys, "admin.vm.property.Set+netvm dom0 name app\x00", "0\x00")
	wantReply(t, sys, "admin.vm.Start+ dom0 name fedora-41\x00", "0\x00")
	wantReply(t, sys, "admin.vm.Start+ dom0 name app\x00", "2\x00StoragePoolException\x00\x00Missing image file '/var/lib/qubes/vm-templates/fedora-41/root.img' for volume appvms/app/root\x00")
	wantReply(t, sys, "admin.vm.Kill+ dom0 name fedora-41\x00", "0\x00")
	wantReply(t, sys, "admin.vm.Start+ dom0 name app\x00", "0\x00")
}
