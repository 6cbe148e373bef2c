package adminapi

import (
	"sort"
	"strings"
	"testing"

	"github.com/qubesbus/qubesbus/bus/rpc"
)

func TestRegistryHasExactlySpecNames(t *testing.T) {
	if len(specNames) != 106 {
		t.Fatalf("spec list has %d names, docs/spec/methods.md §14 says 106", len(specNames))
	}
	want := map[string]bool{}
	for _, n := range specNames {
		if want[n] {
			t.Fatalf("spec list repeats %q", n)
		}
		want[n] = true
	}
	got := map[string]bool{}
	for _, m := range Registry.Methods() {
		got[m.Name] = true
		if !want[m.Name] {
			t.Errorf("registry has %q, which docs/spec/methods.md §14 does not list", m.Name)
		}
	}
	var missing []string
	for n := range want {
		if !got[n] {
			missing = append(missing, n)
		}
	}
	sort.Strings(missing)
	if len(missing) > 0 {
		t.Errorf("registry misses: %s", strings.Join(missing, ", "))
	}
	if n := len(Registry.Methods()); n != 106 || len(table) != 106 {
		t.Errorf("registry has %d methods, table %d lines; want 106", n, len(table))
	}
}

func TestMethodOptions(t *testing.T) {
	type opt struct {
		arg, payload *rpc.Rule
		dest         *rpc.DestRule
		cancellable  *bool
		service      rpc.Service
	}
	rule := func(r rpc.Rule) *rpc.Rule { return &r }
	dest := func(d rpc.DestRule) *rpc.DestRule { return &d }
	yes := true
	cases := map[string]opt{
		"admin.vm.List":         {arg: rule(rpc.Forbidden), payload: rule(rpc.Forbidden), dest: dest(rpc.AnyDest)},
		"admin.property.Get":    {arg: rule(rpc.Required), dest: dest(rpc.AdminVMDest)},
		"admin.vm.notes.Get":    {dest: dest(rpc.NotAdminVMDest)},
		"admin.label.Create":    {arg: rule(rpc.Required), payload: rule(rpc.Required)},
		"admin.vm.feature.Set":  {payload: rule(rpc.Any)},
		"admin.Events":          {arg: rule(rpc.Forbidden), payload: rule(rpc.Forbidden), dest: dest(rpc.AnyDest), cancellable: &yes, service: rpc.Gateway},
		"admin.vm.Stats":        {arg: rule(rpc.Forbidden), payload: rule(rpc.Forbidden), dest: dest(rpc.AnyDest), cancellable: &yes, service: rpc.VMLifecycle},
		"admin.vm.Start":        {service: rpc.VMLifecycle},
		"admin.vm.property.Get": {arg: rule(rpc.Required), payload: rule(rpc.Forbidden), dest: dest(rpc.AnyDest), service: rpc.Properties},
		"admin.backup.Info":     {arg: rule(rpc.Required), payload: rule(rpc.Forbidden), dest: dest(rpc.AdminVMDest), service: rpc.Backup},
		"admin.backup.Execute":  {arg: rule(rpc.Required), payload: rule(rpc.Forbidden), dest: dest(rpc.AdminVMDest), service: rpc.Backup},
		"admin.backup.Cancel":   {arg: rule(rpc.Required), payload: rule(rpc.Forbidden), dest: dest(rpc.AdminVMDest), service: rpc.Backup},
	}
	for name, c := range cases {
		m, ok := Registry.Lookup(name)
		if !ok {
			t.Errorf("%s: not registered", name)
			continue
		}
		if c.arg != nil && m.Arg != *c.arg {
			t.Errorf("%s: arg %v, want %v", name, m.Arg, *c.arg)
		}
		if c.payload != nil && m.Payload != *c.payload {
			t.Errorf("%s: payload %v, want %v", name, m.Payload, *c.payload)
		}
		if c.dest != nil && m.Dest != *c.dest {
			t.Errorf("%s: dest %v, want %v", name, m.Dest, *c.dest)
		}
		if c.cancellable != nil && m.Cancellable != *c.cancellable {
			t.Errorf("%s: cancellable %v, want %v", name, m.Cancellable, *c.cancellable)
		}
		if c.service != "" && m.Service != c.service {
			t.Errorf("%s: service %q, want %q", name, m.Service, c.service)
		}
	}
	if _, ok := Registry.Lookup("admin.vm.Nope"); ok {
		t.Error("Lookup found admin.vm.Nope")
	}
}

func TestOnlyStreamsCancellable(t *testing.T) {
	for _, m := range Registry.Methods() {
		want := m.Name == "admin.Events" || m.Name == "admin.vm.Stats"
		if m.Cancellable != want {
			t.Errorf("%s: cancellable %v, want %v", m.Name, m.Cancellable, want)
		}
	}
	if g := Registry.Owned(rpc.Gateway); len(g) != 1 || g[0].Name != "admin.Events" {
		t.Errorf("gateway owns %v, want only admin.Events", g)
	}
}

// changesConfigNotWrite are the ChangesConfig methods whose policy class is not write:
// admin.backup.Execute is R+X in qubesd but saves qubes.xml (backup timestamps).
var changesConfigNotWrite = map[string]rpc.Access{"admin.backup.Execute": rpc.Execute}

func TestChangesConfigIsWrite(t *testing.T) {
	n := 0
	for _, m := range Registry.Methods() {
		if !m.ChangesConfig {
			continue
		}
		n++
		want := rpc.Write
		if a, ok := changesConfigNotWrite[m.Name]; ok {
			want = a
		}
		if m.Access != want {
			t.Errorf("%s changes config but has access %v, want %v", m.Name, m.Access, want)
		}
	}
	// docs/spec/methods.md §13: property/feature/tag Set+Reset/Remove (8),
	// label.Create/Remove (2), 12 Create*, CreateDisposable, Remove, 2×3 device +
	// denied.Add/Remove (8), 7 volume, 4 pool, backup.Execute.
	if n != 8+2+12+2+8+7+4+1 {
		t.Errorf("%d methods change config, want %d", n, 8+2+12+2+8+7+4+1)
	}
	for _, name := range []string{"admin.vm.firewall.Set", "admin.vm.notes.Set", "admin.vm.volume.CloneFrom"} {
		if m, _ := Registry.Lookup(name); m.ChangesConfig {
			t.Errorf("%s must not save qubes.xml", name)
		}
	}
}

func TestNewRegistryPanicsOnDuplicate(t *testing.T) {
	defer func() {
		r := recover()
		if r == nil {
			t.Fatal("NewRegistry accepted a duplicate name")
		}
		if s, _ := r.(string); !strings.Contains(s, "admin.vm.List") {
			t.Errorf("panic %v does not name the method", r)
		}
	}()
	m, _ := Registry.Lookup("admin.vm.List")
	rpc.NewRegistry(table[0], m, m)
}
