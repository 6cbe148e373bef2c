package configstore

import (
	"errors"
	"testing"

	"github.com/qubesbus/qubesbus/bus/rpc"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/schemas/config"
)

func TestPermitsEachServiceOnlyWhatItOwns(t *testing.T) {
	op := func(k config.OpKind, name string) config.Op {
		return config.Op{Kind: k, Domain: "domain-1", Name: name}
	}
	tests := []struct {
		caller string
		op     config.Op
		ok     bool
	}{
		{string(rpc.Properties), op(config.OpSetProperty, "netvm"), true},
		{string(rpc.Properties), op(config.OpSetFeature, "x"), true},
		{string(rpc.Properties), op(config.OpAddDomain, ""), true},
		{string(rpc.Properties), op(config.OpAddPool, ""), false},
		{string(rpc.Properties), op(config.OpSetFirewall, ""), false},
		{string(rpc.Properties), op(config.OpSetDevices, "pci"), false},
		{string(rpc.Properties), op(config.OpSetVolumeConfig, ""), false},
		{string(rpc.Storage), op(config.OpSetPool, ""), true},
		{string(rpc.Storage), op(config.OpSetVolumeConfig, ""), true},
		{string(rpc.Storage), op(config.OpSetFeature, "x"), false},
		{string(rpc.Storage), op(config.OpDelDomain, ""), false},
		{string(rpc.Devices), op(config.OpSetDevices, "usb"), true},
		{string(rpc.Devices), op(config.OpSetFirewall, ""), true},
		{string(rpc.Devices), op(config.OpSetProperty, "devices_denied"), true},
		{string(rpc.Devices), op(config.OpDelProperty, "devices_denied"), true},
		{string(rpc.Devices), op(config.OpSetProperty, "netvm"), false},
		{string(rpc.Backup), op(config.OpSetProperty, "backup_timestamp"), true},
		{string(rpc.Backup), op(config.OpDelProperty, "backup_timestamp"), false},
		{string(rpc.Backup), op(config.OpSetProperty, "label"), false},
		{string(rpc.VMLifecycle), config.Op{Kind: config.OpDelDomain, Domain: "domain-9"}, true},
		{string(rpc.VMLifecycle), config.Op{Kind: config.OpDelDomain, Domain: "domain-1"}, false},
		{string(rpc.VMLifecycle), config.Op{Kind: config.OpDelDomain, Domain: "domain-8"}, false},
		{string(rpc.VMLifecycle), config.Op{Kind: config.OpDelDomain, Domain: "domain-404"}, false},
		{string(rpc.VMLifecycle), op(config.OpSetProperty, "xid"), false},
		{string(rpc.Gateway), op(config.OpSetFeature, "x"), false},
		{"stranger", op(config.OpSetFeature, "x"), false},
		{"", op(config.OpSetFeature, "x"), false},
		{Operator, op(config.OpSetFirewall, ""), true},
	}
	// domain-9 is a disposable removed when it stops, domain-8 one kept, domain-1 an
	// AppVM (with auto_cleanup, which only a DispVM heeds).
	cleanup := []config.Property{{Name: "auto_cleanup", Value: "True"}}
	qubes := map[string]*config.Domain{
		"domain-1": {ID: "domain-1", Class: "AppVM", Properties: cleanup},
		"domain-8": {ID: "domain-8", Class: "DispVM"},
		"domain-9": {ID: "domain-9", Class: "DispVM", Properties: cleanup},
	}
	view := func(id string, f func(*config.Domain)) { f(qubes[id]) }
	for _, tt := range tests {
		err := Permits(tt.caller, []config.Op{tt.op}, view)
		if tt.ok && err != nil {
			t.Errorf("%s %s %q refused: %v", tt.caller, tt.op.Kind, tt.op.Name, err)
		}
		if !tt.ok && !errors.Is(err, ErrNotPermitted) {
			t.Errorf("%s %s %q: %v, want ErrNotPermitted", tt.caller, tt.op.Kind, tt.op.Name, err)
		}
	}
	// A batch is refused whole for one op not the caller's.
	batch := []config.Op{op(config.OpSetVolumeConfig, ""), op(config.OpSetFeature, "x")}
	if err := Permits(string(rpc.Storage), batch, view); !errors.Is(err, ErrNotPermitted) {
		t.Fatalf("storage's batch with a feature: %v", err)
	}
	// The reply carries the refusal back to a client as the same sentinel.
	if _, err := ReplyFor(0, Permits(string(rpc.Storage), batch, view)).result(); !errors.Is(err, ErrNotPermitted) || !errors.Is(err, ErrRejected) {
		t.Fatalf("refusal through the reply: %v", err)
	}
}

func TestCallerOfApplySubject(t *testing.T) {
	h := subject.ForHost("lab-7")
	for _, caller := range []string{string(rpc.Storage), Operator} {
		if got := CallerOf(ApplySubject(h, caller)); got != caller {
			t.Errorf("CallerOf(ApplySubject(%q)) = %q", caller, got)
		}
	}
	for _, subj := range []string{h.Store(OpApply), h.Store(OpSync), h.Store(OpFlush) + ".storage", "apply.storage"} {
		if got := CallerOf(subj); got != "" {
			t.Errorf("CallerOf(%q) = %q, want none", subj, got)
		}
	}
}
