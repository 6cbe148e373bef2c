package storage

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"

	"github.com/qubesbus/qubesbus/bus/qerr"
	storageapi "github.com/qubesbus/qubesbus/schemas/storage"
)

// powerStates is a lifecycle whose answer a test changes between calls.
type powerStates struct {
	mu sync.Mutex
	m  map[string]string
}

func (p *powerStates) set(qube, state string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.m[qube] = state
}

func (p *powerStates) PowerStates(context.Context) (map[string]string, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make(map[string]string, len(p.m))
	for k, v := range p.m {
		out[k] = v
	}
	return out, nil
}

// TestResizeRunningQube: qubesd's Storage.resize resizes the volume through its
// driver whatever the power state, then has a running qube grow its filesystem
// (domain-cmd-pre-run start_guid=False, then qubes.ResizeDisk over qrexec). A paused
// qube refuses the service and a starting one has no qrexec yet: the call fails with
// qubesd's error but the volume stays resized (qubesd saves in a finally). The oracle
// (real qubesd, fixture qubes.xml) answered exactly this for work's private, root and
// volatile volumes running, and "Domain 'work' is paused" with the new size kept.
func TestResizeRunningQube(t *testing.T) {
	h := newHarness(t)
	life := &powerStates{m: map[string]string{"dom0": "Running"}}
	h.startWith(t, life)
	var seq uint64
	h.EventsAfter(&seq)
	size := func(qube string) string {
		t.Helper()
		for _, l := range strings.Split(infoOf(t, h, qube), "\n") {
			if v, ok := strings.CutPrefix(l, "size="); ok {
				return v
			}
		}
		t.Fatalf("no size in %s's info", qube)
		return ""
	}
	wantEvents := func(want ...string) {
		t.Helper()
		if got := h.EventsAfter(&seq); strings.Join(got, "\n") != strings.Join(want, "\n") {
			t.Fatalf("events %q, want %q", got, want)
		}
	}

	// Halted: the driver's resize only.
	wantOK(t, h.Call("", "admin.vm.volume.Resize", "work", "private", []byte("3221225472")), "")
	wantEvents()
	// Running (file-reflink: the running image grows in place).
	life.set("work", "Running")
	wantOK(t, h.Call("", "admin.vm.volume.Resize", "work", "private", []byte("4294967296")), "")
	wantEvents("work|domain-cmd-pre-run|start_guid=False")
	if got := size("work"); got != "4294967296" {
		t.Fatalf("size %s after an online resize", got)
	}
	// Paused, starting: qubesd's error, the volume resized all the same.
	for _, tc := range []struct{ state, size, class, msg string }{
		{"Paused", "5368709120", "QubesVMNotRunningError", "Domain 'work' is paused"},
		{"Transient", "6442450944", "QubesVMError", "Domain 'work': qrexec not connected"},
	} {
		life.set("work", tc.state)
		wantErr(t, h.Call("", "admin.vm.volume.Resize", "work", "private", []byte(tc.size)), tc.class, tc.msg)
		wantEvents()
		if got := size("work"); got != tc.size {
			t.Fatalf("%s: size %s, want the volume resized to %s", tc.state, got, tc.size)
		}
	}

	// A simulated lvm_thin volume of a running qube (lvextend of its snapshot).
	lab := inThinPool(t, h, "personal")
	h.EventsAfter(&seq)
	life.set("personal", "Running")
	wantOK(t, h.Call("", "admin.vm.volume.Resize", "personal", "private", []byte("4294967296")), "")
	wantEvents("personal|domain-cmd-pre-run|start_guid=False")
	if got := size("personal"); got != "4294967296" {
		t.Fatalf("size %s after an online resize of an lvm_thin volume", got)
	}
	// The driver's failure comes first: no service is run.
	setFaults(t, lab, storageapi.LabFaultSpec{ResizeFails: "Failed to resize: device busy"})
	wantErr(t, h.Call("", "admin.vm.volume.Resize", "personal", "private", []byte("8589934592")),
		"StoragePoolException", "Failed to resize: device busy")
	wantEvents()
	if got := size("personal"); got != "4294967296" {
		t.Fatalf("size %s after a failed resize", got)
	}
}

// TestResizeRefusalsPerDriver: the texts of qubesd's drivers for volumes they will
// not resize (file.py, reflink.py, lvm.py; zfs.py checks nothing).
func TestResizeRefusalsPerDriver(t *testing.T) {
	ctx := context.Background()
	pools := testPools(t)
	ro := Volume{Name: "root", Pool: "p", VID: "vm-templates/t/root", RW: false, SaveOnStop: true, Size: 1 << 20}
	snap := Volume{Name: "root", Pool: "p", VID: "appvms/q/root", RW: true, SnapOnStart: true, Source: ro.VID, Size: 1 << 20}
	for _, tc := range []struct {
		driver string
		v      Volume
		msg    string // "": resized
	}{
		{"file", ro, "Can not resize readonly volume vm-templates/t/root"},
		{"file", snap, "Cannot resize volume based on a template - resizethe template instead"},
		{"file-reflink", ro, "Cannot resize: vm-templates/t/root is read-only"},
		{"file-reflink", snap, ""},
		{"lvm_thin", ro, "Can not resize readonly volume vm-templates/t/root"},
		{"lvm_thin", snap, ""},
		{"zfs", ro, ""},
	} {
		err := pools[tc.driver].Resize(ctx, tc.v, 2<<20)
		var qe *qerr.Error
		switch {
		case tc.msg == "" && err != nil:
			t.Errorf("%s %s: %v, want resized", tc.driver, tc.v.VID, err)
		case tc.msg != "" && (!errors.As(err, &qe) || qe.Class != "StoragePoolException" || qe.Message != tc.msg):
			t.Errorf("%s %s: %v, want StoragePoolException %q", tc.driver, tc.v.VID, err, tc.msg)
		}
	}
}
