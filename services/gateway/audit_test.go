package gateway

import (
	"context"
	"log/slog"
	"net"
	"sync"
	"testing"

	"github.com/qubesbus/qubesbus/bus/audit"
	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/bus/rpc"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/schemas/adminapi"
)

// auditLog is an Auditor that keeps the records.
type auditLog struct {
	mu   sync.Mutex
	recs []audit.Record
}

func (a *auditLog) Record(r audit.Record) {
	a.mu.Lock()
	a.recs = append(a.recs, r)
	a.mu.Unlock()
}

func (a *auditLog) take() []audit.Record {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := a.recs
	a.recs = nil
	return out
}

// namedQubes resolves every name: dom0 is the AdminVM, the rest AppVMs.
type namedQubes struct{}

// A fixed set of qubes: always at revision 0, never waits.
func (namedQubes) Revision() uint64                           { return 0 }
func (namedQubes) WaitRevision(context.Context, uint64) error { return nil }

func (namedQubes) ResolveName(_ context.Context, name string) (rpc.Ref, error) {
	if name == "dom0" {
		return rpc.Ref{Name: name, Class: "AdminVM"}, nil
	}
	return rpc.Ref{Name: name, Class: "AppVM"}, nil
}
func (namedQubes) ResolveUUID(context.Context, string) (rpc.Ref, error) { return rpc.Ref{}, nil }

// onlyDom0 allows calls from dom0 only.
type onlyDom0 struct{}

func (onlyDom0) Allowed(_, _ string, src, _ rpc.Ref) bool { return src.IsAdminVM() }

// TestAuditRecords: the gateway records changes whatever their outcome, refused and
// malformed calls, and nothing else.
func TestAuditRecords(t *testing.T) {
	ns := bustest.RunJetStream(t)
	host := subject.ForHost("t")
	reg := rpc.NewRegistry(
		rpc.Method{Name: "admin.vm.List", Service: rpc.Properties, Arg: rpc.Forbidden, Payload: rpc.Forbidden},
		rpc.Method{Name: "admin.vm.feature.Set", Service: rpc.Properties, Arg: rpc.Required, ChangesConfig: true, Access: rpc.Write},
		rpc.Method{Name: "admin.vm.Start", Service: rpc.Properties, Arg: rpc.Forbidden, Payload: rpc.Forbidden, Access: rpc.Execute},
	)
	mux := rpc.NewMux(reg, rpc.Properties, namedQubes{}, slog.New(slog.DiscardHandler))
	mux.Auth = onlyDom0{}
	mux.HandleUnknown()
	ok := func(context.Context, *rpc.Call) ([]byte, error) { return nil, nil }
	mux.Handle("admin.vm.List", ok)
	mux.Handle("admin.vm.feature.Set", ok)
	mux.Handle("admin.vm.Start", ok)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if _, err := mux.Serve(ctx, bustest.Connect(t, ns), host); err != nil {
		t.Fatal(err)
	}
	aud := &auditLog{}
	_, sock := serveGateway(t, ns, Config{Host: host, Audit: aud}, reg)

	exc := func(class string) audit.Record {
		return audit.Record{Outcome: audit.OutcomeException, Exception: class}
	}
	okRec := audit.Record{Outcome: audit.OutcomeOK}
	cases := []struct {
		name, req string
		want      *audit.Record // nil: no record; the call's fields are checked apart
	}{
		{"read", "admin.vm.List+ dom0 name dom0\x00", nil},
		{"change", "admin.vm.feature.Set+f dom0 name work\x00secret", &okRec},
		{"power", "admin.vm.Start+ dom0 name work\x00", &okRec},
		{"refused by policy", "admin.vm.List+ work name dom0\x00", ptr(exc("PermissionDenied"))},
		{"refused change", "admin.vm.Start+ work name work\x00", ptr(exc("PermissionDenied"))},
		{"refused by the checks", "admin.vm.List+x dom0 name dom0\x00", ptr(exc("ProtocolError"))},
		{"failed change", "admin.vm.feature.Set+ dom0 name work\x00", ptr(exc("ProtocolError"))},
		{"unknown method", "admin.no.Such+ dom0 name dom0\x00", ptr(exc("ProtocolError"))},
	}
	for _, c := range cases {
		ask(t, sock, c.req)
		recs := aud.take()
		if c.want == nil {
			if len(recs) != 0 {
				t.Errorf("%s: recorded %+v", c.name, recs)
			}
			continue
		}
		if len(recs) != 1 {
			t.Errorf("%s: %d records, want 1: %+v", c.name, len(recs), recs)
			continue
		}
		r := recs[0]
		req, err := DecodeRequest([]byte(c.req))
		if err != nil {
			t.Fatal(err)
		}
		if r.Outcome != c.want.Outcome || r.Exception != c.want.Exception || r.Method != req.Method || r.Source != req.Source ||
			r.Dest != req.Dest || r.Arg != req.Arg || r.PayloadLen != len(req.Payload) || r.RequestID == "" || r.Time.IsZero() {
			t.Errorf("%s: record %+v, want %s/%s of %+v", c.name, r, c.want.Outcome, c.want.Exception, req)
		}
	}

	// A request the gateway cannot split is recorded with no call fields; a connection
	// that sends nothing (a probe of the socket) is not recorded.
	ask(t, sock, "no NUL here")
	if recs := aud.take(); len(recs) != 1 || recs[0].Outcome != audit.OutcomeAbort || recs[0].Reason != ErrFraming.Error() ||
		recs[0].PayloadLen != len("no NUL here") || recs[0].Method != "" {
		t.Errorf("framing error: %+v", recs)
	}
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	ask(t, sock, "admin.vm.List+ dom0 name dom0\x00") // after the probe's connection
	if recs := aud.take(); len(recs) != 0 {
		t.Errorf("empty connection recorded: %+v", recs)
	}
}

func ptr[T any](v T) *T { return &v }

// TestAuditRuleOverTheRegistry: in the real registry every power method and every
// method that saves qubes.xml is a change; the reads are not.
func TestAuditRuleOverTheRegistry(t *testing.T) {
	for _, name := range []string{"admin.vm.Start", "admin.vm.Shutdown", "admin.vm.Kill", "admin.vm.Pause",
		"admin.vm.Unpause", "admin.vm.Suspend", "admin.vm.Resume", "admin.vm.property.Set", "admin.vm.Create.AppVM",
		"admin.vm.Remove", "admin.vm.notes.Set", "admin.backup.Execute"} {
		m, ok := adminapi.Registry.Lookup(name)
		if !ok || !audit.Changes(m) {
			t.Errorf("%s is not audited as a change", name)
		}
	}
	for _, m := range adminapi.Registry.Methods() {
		if m.ChangesConfig && !audit.Changes(m) {
			t.Errorf("%s saves qubes.xml but is not audited", m.Name)
		}
	}
	for _, name := range []string{"admin.vm.List", "admin.vm.property.Get", "admin.Events", "admin.vm.Stats", "admin.vm.CurrentState"} {
		if m, _ := adminapi.Registry.Lookup(name); audit.Changes(m) {
			t.Errorf("read %s audited as a change", name)
		}
	}
}
