package system

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus/audit"
	"github.com/qubesbus/qubesbus/bus/cloudevent"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/access"
)

// readAudit reads QUBES_AUDIT from its start as the auditor role until it holds n
// records (or a minute has passed), and checks that the stream holds no more.
func readAudit(t *testing.T, sys *System, n int) []audit.Record {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	js, err := jetstream.New(connectAs(t, sys, access.Auditor))
	if err != nil {
		t.Fatal(err)
	}
	cons, err := js.OrderedConsumer(ctx, audit.StreamName, jetstream.OrderedConsumerConfig{DeliverPolicy: jetstream.DeliverAllPolicy})
	if err != nil {
		t.Fatalf("auditor's consumer: %v", err)
	}
	it, err := cons.Messages()
	if err != nil {
		t.Fatal(err)
	}
	defer it.Stop()
	var out []audit.Record
	for len(out) < n {
		m, err := it.Next(jetstream.NextContext(ctx))
		if err != nil {
			t.Fatalf("after %d of %d records: %v (got %+v)", len(out), n, err, out)
		}
		var r audit.Record
		if err := json.Unmarshal(m.Data(), &r); err != nil {
			t.Fatalf("record %q: %v", m.Data(), err)
		}
		out = append(out, r)
	}
	// Records are stored in the order of the calls: the last one expected is in, so
	// any record of an earlier call would be too.
	s, err := js.Stream(ctx, audit.StreamName)
	if err != nil {
		t.Fatal(err)
	}
	if got := s.CachedInfo().State.Msgs; got != uint64(n) {
		t.Fatalf("QUBES_AUDIT holds %d records, want %d: %+v", got, n, out)
	}
	return out
}

// auditCall is a call through the socket and the audit record it must leave (nil: none).
type auditCall struct {
	req, resp string // resp: the reply's first bytes
	want      *audit.Record
}

// sendAuditCalls makes the calls in order, checks each reply's start, and returns the
// records they must leave.
func sendAuditCalls(t *testing.T, sys *System, calls []auditCall) []*audit.Record {
	t.Helper()
	var want []*audit.Record
	for _, c := range calls {
		if got := roundTrip(t, sys.Socket, []byte(c.req)); !strings.HasPrefix(string(got), c.resp) {
			t.Fatalf("%q: %q, want %q…", c.req, got, c.resp)
		}
		if c.want != nil {
			want = append(want, c.want)
		}
	}
	return want
}

// TestAuditTrail: through the socket, an allowed change, an allowed power call and
// refused calls each leave exactly one record on QUBES_AUDIT; reads leave none.
func TestAuditTrail(t *testing.T) {
	pf := filepath.Join(t.TempDir(), "policy")
	if err := os.WriteFile(pf, []byte("admin.vm.property.Get +label work @anyvm allow\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	sys := startSystem(t, func(c *Config) { c.PolicyFile = pf })
	denied := "2\x00PermissionDenied\x00\x00\x00"
	rec := func(source, method, dest, arg, outcome, exception string, payload int) *audit.Record {
		return &audit.Record{Host: "test", Source: source, Method: method, Dest: dest, Arg: arg, Outcome: outcome,
			Exception: exception, PayloadLen: payload}
	}
	calls := []auditCall{
		{"admin.vm.property.Set+label dom0 name work\x00red", "0\x00", rec("dom0", "admin.vm.property.Set", "work", "label", "ok", "", 3)},
		{"admin.vm.property.Get+label dom0 name work\x00", "0\x00default=False type=label red", nil},
		{"admin.vm.property.Get+label work name work\x00", "0\x00default=False type=label red", nil}, // allowed by the policy
		{"admin.vm.Start+ dom0 name work\x00", "0\x00", rec("dom0", "admin.vm.Start", "work", "", "ok", "", 0)},
		{"admin.vm.property.Set+label work name work\x00green", denied, rec("work", "admin.vm.property.Set", "work", "label", "exception", "PermissionDenied", 5)},
		{"admin.vm.property.Get+netvm work name work\x00", denied, rec("work", "admin.vm.property.Get", "work", "netvm", "exception", "PermissionDenied", 0)},
		{"admin.vm.List+ dom0 name dom0\x00", "0\x00dom0", nil},
		{"admin.vm.Kill+ work name work\x00", denied, rec("work", "admin.vm.Kill", "work", "", "exception", "PermissionDenied", 0)},
	}
	want := sendAuditCalls(t, sys, calls)
	got := readAudit(t, sys, len(want))
	ids := map[string]bool{}
	for i, r := range got {
		w := *want[i]
		w.Time, w.RequestID = r.Time, r.RequestID
		if r != w {
			t.Errorf("record %d:\n got %+v\nwant %+v", i, r, w)
		}
		if r.RequestID == "" || ids[r.RequestID] || time.Since(r.Time) > time.Minute || r.Time.Location() != time.UTC {
			t.Errorf("record %d: request id %q, time %v", i, r.RequestID, r.Time)
		}
		ids[r.RequestID] = true
	}
}

// TestOnlyTheGatewayWritesTheAuditTrail: every other role is refused when it
// publishes on the audit subject; the events role cannot read the audit stream nor
// the auditor role the events stream.
func TestOnlyTheGatewayWritesTheAuditTrail(t *testing.T) {
	sys := startSystem(t)
	host := subject.ForHost("test")
	forged := nats.NewMsg(host.Audit())
	forged.Data = []byte(`{"method":"admin.vm.Start","outcome":"ok"}`)
	for _, r := range access.Roles {
		if r.Name == access.Gateway || r.Name == access.Admin {
			continue
		}
		t.Run(r.Name, func(t *testing.T) { expectRefused(t, connectAs(t, sys, r.Name), forged) })
	}
	// A refused call is recorded; the forged records are not.
	if got := roundTrip(t, sys.Socket, []byte("admin.vm.Start+ personal name work\x00")); string(got) != "2\x00PermissionDenied\x00\x00\x00" {
		t.Fatalf("refused call: %q", got)
	}
	if recs := readAudit(t, sys, 1); recs[0].Source != "personal" {
		t.Fatalf("record %+v", recs[0])
	}

	for _, c := range []struct{ role, stream string }{{access.Events, audit.StreamName}, {access.Auditor, cloudevent.StreamName}} {
		nc := connectAs(t, sys, c.role)
		denied := make(chan error, 4)
		nc.SetErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) { denied <- err })
		js, _ := jetstream.New(nc)
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, err := js.OrderedConsumer(ctx, c.stream, jetstream.OrderedConsumerConfig{})
		cancel()
		if err == nil {
			t.Errorf("%s read %s", c.role, c.stream)
			continue
		}
		select {
		case perr := <-denied:
			if !errors.Is(perr, nats.ErrPermissionViolation) {
				t.Errorf("%s on %s: %v, want a permissions violation", c.role, c.stream, perr)
			}
		case <-time.After(time.Minute):
			t.Errorf("%s on %s: no permissions violation (consumer: %v)", c.role, c.stream, err)
		}
	}
}

// TestAuditTrailOfEveryService: the calls of storage, devices, the firewall and
// backup that change something each leave one record, with its outcome and exception
// class (a failed change too), and so do the refused calls of their reads; their
// reads that succeed leave none.
func TestAuditTrailOfEveryService(t *testing.T) {
	var root string
	sys := startSystem(t, storageRoot(t, &root), func(c *Config) { c.BackupProfiles = t.TempDir() })
	denied := "2\x00PermissionDenied\x00\x00\x00"
	rec := func(source, method, dest, arg, outcome, exception string, payload int) *audit.Record {
		return &audit.Record{Host: "test", Source: source, Method: method, Dest: dest, Arg: arg, Outcome: outcome,
			Exception: exception, PayloadLen: payload}
	}
	assign := "device_id='0x8086:0x51f0::p028000' port_id='00_14.3' devclass='pci' backend_domain='dom0' mode='required' frontend_domain='work'"
	fw := "action=accept dsthost=qubes-os.org\naction=drop\n"
	calls := []auditCall{
		// Storage.
		{"admin.pool.Add+file dom0 name dom0\x00name=extra\ndir_path=" + root + "/extra", "0\x00", rec("dom0", "admin.pool.Add", "dom0", "file", "ok", "", len("name=extra\ndir_path="+root+"/extra"))},
		{"admin.pool.List+ dom0 name dom0\x00", "0\x00", nil},
		{"admin.vm.volume.Resize+private dom0 name work\x004294967296", "0\x00", rec("dom0", "admin.vm.volume.Resize", "work", "private", "ok", "", 10)},
		{"admin.vm.volume.Resize+private dom0 name work\x00x", "2\x00ProtocolError", rec("dom0", "admin.vm.volume.Resize", "work", "private", "exception", "ProtocolError", 1)},
		{"admin.vm.volume.List+ work name work\x00", denied, rec("work", "admin.vm.volume.List", "work", "", "exception", "PermissionDenied", 0)},
		{"admin.pool.Remove+extra dom0 name dom0\x00", "0\x00", rec("dom0", "admin.pool.Remove", "dom0", "extra", "ok", "", 0)},
		// Devices.
		{"admin.vm.device.pci.Assign+dom0+00_14.3+0x8086+0x51f0++p028000 dom0 name work\x00" + assign, "0\x00",
			rec("dom0", "admin.vm.device.pci.Assign", "work", "dom0+00_14.3+0x8086+0x51f0++p028000", "ok", "", len(assign))},
		{"admin.vm.device.pci.Assigned+ dom0 name work\x00", "0\x00dom0+00_14.3", nil},
		{"admin.vm.device.pci.Attach+dom0+00_14.3+0x8086+0x51f0++p028000 dom0 name work\x00", "2\x00QubesVMNotRunningError",
			rec("dom0", "admin.vm.device.pci.Attach", "work", "dom0+00_14.3+0x8086+0x51f0++p028000", "exception", "QubesVMNotRunningError", 0)},
		{"admin.vm.device.pci.Unassign+dom0+00_14.3+0x8086+0x51f0++p028000 dom0 name work\x00", "0\x00",
			rec("dom0", "admin.vm.device.pci.Unassign", "work", "dom0+00_14.3+0x8086+0x51f0++p028000", "ok", "", 0)},
		{"admin.vm.device.pci.Assign+dom0+00_14.3+0x8086+0x51f0++p028000 work name work\x00" + assign, denied,
			rec("work", "admin.vm.device.pci.Assign", "work", "dom0+00_14.3+0x8086+0x51f0++p028000", "exception", "PermissionDenied", len(assign))},
		// The firewall.
		{"admin.vm.firewall.Set+ dom0 name work\x00" + fw, "0\x00", rec("dom0", "admin.vm.firewall.Set", "work", "", "ok", "", len(fw))},
		{"admin.vm.firewall.Get+ dom0 name work\x00", "0\x00action=accept", nil},
		{"admin.vm.firewall.Reload+ dom0 name work\x00", "0\x00", rec("dom0", "admin.vm.firewall.Reload", "work", "", "ok", "", 0)},
		{"admin.vm.firewall.Get+ work name work\x00", denied, rec("work", "admin.vm.firewall.Get", "work", "", "exception", "PermissionDenied", 0)},
		// Backup.
		{"admin.backup.Execute+nope dom0 name dom0\x00", "2\x00QubesBackupProfileNotFoundError",
			rec("dom0", "admin.backup.Execute", "dom0", "nope", "exception", "QubesBackupProfileNotFoundError", 0)},
		{"admin.backup.Cancel+nope dom0 name dom0\x00", "2\x00QubesException", rec("dom0", "admin.backup.Cancel", "dom0", "nope", "exception", "QubesException", 0)},
		{"admin.backup.Info+nope work name dom0\x00", denied, rec("work", "admin.backup.Info", "dom0", "nope", "exception", "PermissionDenied", 0)},
	}
	want := sendAuditCalls(t, sys, calls)
	got := readAudit(t, sys, len(want))
	for i, r := range got {
		w := *want[i]
		w.Time, w.RequestID = r.Time, r.RequestID
		if r != w {
			t.Errorf("record %d:\n got %+v\nwant %+v", i, r, w)
		}
		if r.RequestID == "" || time.Since(r.Time) > time.Minute {
			t.Errorf("record %d: request id %q, time %v", i, r.RequestID, r.Time)
		}
	}
}
