package storage

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/bus/envelope"
	"github.com/qubesbus/qubesbus/schemas/config"
	storageapi "github.com/qubesbus/qubesbus/schemas/storage"
)

// inThinPool adds the simulated lvm_thin pool "thin" and moves the private volumes
// of the given qubes into it (their settings only: a simulated pool keeps metadata).
func inThinPool(t *testing.T, h *harness, qubes ...string) storageapi.LabClient {
	t.Helper()
	wantOK(t, h.Call("", "admin.pool.Add", "dom0", "lvm_thin", []byte("name=thin\nvolume_group=qubes_dom0\nthin_pool=vm-pool")), "")
	snap, err := h.Config().Snapshot(h.Ctx)
	if err != nil {
		t.Fatal(err)
	}
	var ops []config.Op
	for _, name := range qubes {
		var d *config.Domain
		for i := range snap.Config.Domains {
			if snap.Config.Domains[i].Name() == name {
				d = &snap.Config.Domains[i]
			}
		}
		if d == nil {
			t.Fatalf("no qube %s", name)
		}
		vols, err := parseVolumeConfig(d.VolumeConfig)
		if err != nil {
			t.Fatal(err)
		}
		for i := range vols {
			if vols[i].Name == "private" {
				vols[i].Pool = "thin"
			}
		}
		ops = append(ops, config.Op{Kind: config.OpSetVolumeConfig, Domain: d.ID, Value: string(renderVolumeConfig(vols))})
	}
	if _, err := h.Config().Apply(h.Ctx, config.Mutation{ExpectRevision: snap.Revision, Ops: ops}); err != nil {
		t.Fatal(err)
	}
	// The change went to the store, not through the service: wait until its replica
	// has it (a call carries no revision to wait for here).
	bustest.CheckFor(t, 10*time.Second, 5*time.Millisecond, func() error {
		for _, name := range qubes {
			if got := infoOf(t, h, name); !strings.HasPrefix(got, "pool=thin\n") {
				return fmt.Errorf("%s's private volume not in the thin pool yet", name)
			}
		}
		return nil
	})
	return storageapi.LabClient{NC: h.Connect(), Host: h.Subjects}
}

func setFaults(t *testing.T, lab storageapi.LabClient, spec storageapi.LabFaultSpec) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := lab.SetFaults(ctx, "thin", spec); err != nil {
		t.Fatal(err)
	}
}

func infoOf(t *testing.T, h *harness, qube string) string {
	t.Helper()
	r := h.Call("", "admin.vm.volume.Info", qube, "private", nil)
	if r.Status != envelope.StatusOK {
		t.Fatalf("Info %s: %s %+v", qube, r.Status, r.Exception)
	}
	return string(r.Content)
}

// TestLabFaults: a lab makes a simulated pool fail resizes, refuse writes as a full
// thin pool does, and clone slowly; every refused call leaves the volume as it was,
// and cleared faults let the same calls through.
func TestLabFaults(t *testing.T) {
	h := newHarness(t)
	h.start(t)
	lab := inThinPool(t, h, "work", "personal")
	before := infoOf(t, h, "work")

	setFaults(t, lab, storageapi.LabFaultSpec{ResizeFails: "Failed to resize: device busy"})
	wantErr(t, h.Call("", "admin.vm.volume.Resize", "work", "private", []byte("4294967296")),
		"StoragePoolException", "Failed to resize: device busy")
	if got := infoOf(t, h, "work"); got != before {
		t.Fatalf("a failed resize changed the volume:\n%s\nwant\n%s", got, before)
	}

	full := "  Cannot create new thin volume, free space in thin pool qubes_dom0/vm-pool reached threshold."
	setFaults(t, lab, storageapi.LabFaultSpec{Full: true})
	wantErr(t, h.Call("", "admin.vm.volume.Resize", "work", "private", []byte("4294967296")), "StoragePoolException", full)
	if got := infoOf(t, h, "work"); got != before {
		t.Fatalf("a resize in a full pool changed the volume")
	}
	r := h.Call("", "admin.vm.volume.CloneFrom", "work", "private", nil)
	wantErr(t, h.Call("", "admin.vm.volume.CloneTo", "personal", "private", r.Content), "StoragePoolException", full)
	wantOK(t, h.Call("", "admin.vm.volume.ListSnapshots", "personal", "private", nil), "")

	const delay = 300 * time.Millisecond
	setFaults(t, lab, storageapi.LabFaultSpec{CloneDelayMS: delay.Milliseconds()})
	wantOK(t, h.Call("", "admin.vm.volume.Resize", "work", "private", []byte("4294967296")), "")
	if got := infoOf(t, h, "work"); !strings.Contains(got, "size=4294967296\n") {
		t.Fatalf("resize after the faults were cleared:\n%s", got)
	}
	r = h.Call("", "admin.vm.volume.CloneFrom", "work", "private", nil)
	began := time.Now()
	wantOK(t, h.Call("", "admin.vm.volume.CloneTo", "personal", "private", r.Content), "")
	if took := time.Since(began); took < delay {
		t.Fatalf("a slow clone took %s, want at least %s", took, delay)
	}
	if got := infoOf(t, h, "personal"); !strings.Contains(got, "size=4294967296\n") {
		t.Fatalf("the slow clone did not take the source's size:\n%s", got)
	}

	// Malformed lab requests are refused and change nothing.
	msg, err := lab.NC.Request(h.Subjects.Lab(storageapi.LabOpFaults), []byte("{"), 5*time.Second)
	if err != nil || !strings.Contains(string(msg.Data), "request must name a pool") {
		t.Fatalf("malformed lab request: %v %q", err, msg.Data)
	}
}
