package rpc

import (
	"context"
	"errors"
	"testing"

	"github.com/qubesbus/qubesbus/bus/envelope"
	"github.com/qubesbus/qubesbus/bus/qerr"
)

// qubes is a resolver over a fixed set of qubes.
type qubes map[string]Ref

// A fixed set of qubes: always at revision 0, never waits.
func (qubes) Revision() uint64                           { return 0 }
func (qubes) WaitRevision(context.Context, uint64) error { return nil }

func (q qubes) ResolveName(_ context.Context, name string) (Ref, error) {
	if r, ok := q[name]; ok {
		return r, nil
	}
	return Ref{}, qerr.ErrVMNotFound
}

func (q qubes) ResolveUUID(_ context.Context, uuid string) (Ref, error) {
	for _, r := range q {
		if r.UUID == uuid {
			return r, nil
		}
	}
	return Ref{}, qerr.ErrVMNotFound
}

func TestCheckOrder(t *testing.T) {
	res := qubes{
		"dom0": {Name: "dom0", Class: "AdminVM", UUID: "00000000-0000-0000-0000-000000000000"},
		"work": {Name: "work", Class: "AppVM", UUID: "e443df78-9558-467f-9ba9-1faf7a024204"},
	}
	list := &Method{Name: "admin.vm.List", Service: Properties, Arg: Forbidden, Payload: Forbidden}
	get := &Method{Name: "admin.property.Get", Service: Properties, Arg: Required, Payload: Forbidden, Dest: AdminVMDest}
	notes := &Method{Name: "admin.vm.notes.Get", Service: Properties, Arg: Forbidden, Payload: Forbidden, Dest: NotAdminVMDest}
	create := &Method{Name: "admin.label.Create", Service: Properties, Arg: Required, Payload: Required, Dest: AdminVMDest}
	tests := []struct {
		name    string
		m       *Method
		req     envelope.Request
		class   string
		msg     string
		abort   bool
		wantRef string
	}{
		{name: "ok", m: list, req: envelope.Request{Method: "admin.vm.List", Source: "dom0", Dest: "work"}, wantRef: "work"},
		{name: "uuid dest", m: list, req: envelope.Request{Method: "admin.vm.List", Source: "dom0", Dest: "uuid:e443df78-9558-467f-9ba9-1faf7a024204"}, wantRef: "work"},
		{name: "missing source wins over everything", m: nil, req: envelope.Request{Method: "x\xff", Source: "nosrc", Dest: "nodest", Arg: "a", Payload: []byte("p")}, class: "QubesVMNotFoundError", msg: "No such domain: 'nosrc'"},
		{name: "missing dest before unknown method", m: nil, req: envelope.Request{Method: "admin.vm.Nope", Source: "dom0", Dest: "nodest"}, class: "QubesVMNotFoundError", msg: "No such domain: 'nodest'"},
		{name: "bad uuid", m: list, req: envelope.Request{Method: "admin.vm.List", Source: "dom0", Dest: "uuid:1234"}, class: "QubesVMInvalidUUIDError", msg: "VM UUID is not valid: '1234'"},
		{name: "uppercase uuid", m: list, req: envelope.Request{Method: "admin.vm.List", Source: "dom0", Dest: "uuid:E443DF78-9558-467F-9BA9-1FAF7A024204"}, class: "QubesVMInvalidUUIDError"},
		{name: "unknown uuid", m: list, req: envelope.Request{Method: "admin.vm.List", Source: "dom0", Dest: "uuid:11111111-1111-1111-1111-111111111111"}, class: "QubesVMNotFoundError", msg: "No such domain: 'uuid:11111111-1111-1111-1111-111111111111'"},
		{name: "non-ascii source aborts", m: list, req: envelope.Request{Method: "admin.vm.List", Source: "d\xffm0", Dest: "dom0"}, abort: true},
		{name: "non-ascii arg aborts after lookup", m: get, req: envelope.Request{Method: "admin.property.Get", Source: "dom0", Dest: "dom0", Arg: "\xff"}, abort: true},
		{name: "unknown method", m: nil, req: envelope.Request{Method: "foo.bar", Source: "dom0", Dest: "dom0"}, class: "ProtocolError", msg: "no such method: 'foo.bar'"},
		{name: "payload before argument", m: list, req: envelope.Request{Method: "admin.vm.List", Source: "dom0", Dest: "dom0", Arg: "x", Payload: []byte("y")}, class: "ProtocolError", msg: "unexpected payload"},
		{name: "expected payload", m: create, req: envelope.Request{Method: "admin.label.Create", Source: "dom0", Dest: "dom0", Arg: "x"}, class: "ProtocolError", msg: "expected payload"},
		{name: "expected argument", m: get, req: envelope.Request{Method: "admin.property.Get", Source: "dom0", Dest: "dom0"}, class: "ProtocolError", msg: "expected an argument"},
		{name: "argument before destination", m: get, req: envelope.Request{Method: "admin.property.Get", Source: "dom0", Dest: "work"}, class: "ProtocolError", msg: "expected an argument"},
		{name: "dest must be adminvm", m: get, req: envelope.Request{Method: "admin.property.Get", Source: "dom0", Dest: "work", Arg: "p"}, class: "ProtocolError", msg: "expected destination to be AdminVM"},
		{name: "dest must not be adminvm", m: notes, req: envelope.Request{Method: "admin.vm.notes.Get", Source: "dom0", Dest: "dom0"}, class: "ProtocolError", msg: "expected destination to not be AdminVM"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			call, err := Check(context.Background(), res, nil, tt.m, &tt.req)
			switch {
			case tt.abort:
				if !errors.Is(err, qerr.ErrAbort) {
					t.Fatalf("err = %v, want abort", err)
				}
			case tt.class != "":
				var qe *qerr.Error
				if !errors.As(err, &qe) || qe.Class != tt.class || (tt.msg != "" && qe.Message != tt.msg) {
					t.Fatalf("err = %v, want %s %q", err, tt.class, tt.msg)
				}
			default:
				if err != nil || call.Dest.Name != tt.wantRef || call.Source.Name != "dom0" {
					t.Fatalf("call %+v, err %v", call, err)
				}
			}
		})
	}
}

func TestRegistryPanicsOnConflict(t *testing.T) {
	m := Method{Name: "admin.vm.List", Service: Properties}
	defer func() {
		if r := recover(); r == nil {
			t.Fatal("duplicate registration did not panic")
		}
	}()
	NewRegistry(m, m)
}

func TestMuxHandleRejectsForeignMethod(t *testing.T) {
	reg := NewRegistry(Method{Name: "admin.vm.Start", Service: VMLifecycle})
	mux := NewMux(reg, Properties, qubes{}, nil)
	defer func() {
		if r := recover(); r == nil {
			t.Fatal("Handle of another service's method did not panic")
		}
	}()
	mux.Handle("admin.vm.Start", func(context.Context, *Call) ([]byte, error) { return nil, nil })
}
