package model

import (
	"testing"

	"github.com/qubesbus/qubesbus/schemas/config"
)

// fixtureWithEveryClass is the fixture plus a DispVM and a RemoteVM, so every holder
// class has a qube.
func fixtureWithEveryClass(t *testing.T) *config.Config {
	t.Helper()
	c := loadFixture(t)
	c.Domains = append(c.Domains,
		config.Domain{ID: "domain-20", Class: "DispVM", Properties: []config.Property{
			{Name: "label", Value: "red"}, {Name: "name", Value: "disp7"}, {Name: "qid", Value: "20"},
			{Name: "uuid", Value: "0b0b0b0b-0000-4000-8000-000000000020"}, {Name: "dispid", Value: "7"},
			{Name: "template", Value: "default-dvm"}}},
		config.Domain{ID: "domain-21", Class: "RemoteVM", Properties: []config.Property{
			{Name: "label", Value: "gray"}, {Name: "name", Value: "far"}, {Name: "qid", Value: "21"},
			{Name: "uuid", Value: "0b0b0b0b-0000-4000-8000-000000000021"}}})
	if err := c.CheckInvariants(); err != nil {
		t.Fatal(err)
	}
	return c
}

var holderOfClass = map[string]string{
	"AppVM": "work", "TemplateVM": "fedora-41", "StandaloneVM": "legacy", "AdminVM": "dom0",
	"DispVM": "disp7", "RemoteVM": "far", GlobalHolder: "",
}

// TestEveryPropertyRejects sends each rejection class to every property of every
// holder class: non-ASCII bytes, text of the wrong type, non-printable text, a qube
// that does not exist, and (for write-once and read-only properties) any value.
func TestEveryPropertyRejects(t *testing.T) {
	c := fixtureWithEveryClass(t)
	m := New(c, DefaultHost, nil)
	for class, vm := range holderOfClass {
		h := holder(t, m, vm)
		for _, s := range SpecsOf(class) {
			set := func(payload string) string {
				ch, err := m.Set(h, s.Name, []byte(payload))
				if err != nil {
					return errText(err)
				}
				return "veto " + errText(ch.Err)
			}
			name := class + "." + s.Name
			wantNonASCII := "QubesValueError: Non-ASCII bytes in property value"
			if s.Kind == KindVM {
				wantNonASCII = "QubesValueError: "
			}
			if got := set("\xff"); got != wantNonASCII {
				t.Errorf("%s non-ASCII: %s", name, got)
			}
			var bad, want string
			switch s.Kind {
			case KindBool:
				bad, want = "x!", "QubesValueError: Invalid literal for boolean property: 'x!'"
			case KindStr:
				bad, want = "a\x01", "QubesValueError: Invalid characters in property value"
			case KindVM:
				bad, want = "1x", "QubesValueError: VM name cannot start with hyphen, underscore, dot or numbers"
			default:
				bad, want = "x!", "QubesValueError: Failed to parse property value as "+s.Kind.parserName()
			}
			if got := set(bad); got != want {
				t.Errorf("%s wrong type %q: %s, want %s", name, bad, got, want)
			}
			if s.Kind == KindVM {
				if got, want := set("ghost"), "QubesPropertyValueError: Can't set "+s.Name+" to non-existing qube ghost"; got != want {
					t.Errorf("%s nonexistent qube: %s", name, got)
				}
			}
			valid := map[Kind]string{KindBool: "True", KindInt: "1", KindIPv4: "10.0.0.1", KindIPv6: "::1",
				KindUUID: "12345678-1234-5678-1234-567812345678", KindStr: "x", KindVM: ""}[s.Kind]
			_, stored := m.stored(h, s.Name)
			switch {
			case s.WriteOnce && stored:
				if got := set(valid); got != "abort" {
					t.Errorf("%s write-once: %s", name, got)
				}
			case s.ReadOnly:
				if got, want := set(valid), "QubesPropertyValueError: property '"+s.Name+"' on "+class+" instance cannot be set"; got != want {
					t.Errorf("%s read-only: %s", name, got)
				}
			}
			if _, err := m.Get(h, s.Name); err != nil {
				t.Errorf("%s Get: %v", name, err)
			}
			if s.Help == "" {
				t.Errorf("%s has no help text", name)
			}
		}
	}
}

// The List order of every class is (load stage, name), and the classes list what
// docs/spec/properties.md says.
func TestListOrder(t *testing.T) {
	for class, want := range map[string]string{
		"AdminVM": "devices_denied icon include_in_backups keyboard_layout klass label maxmem name qid updateable uuid default_dispvm",
		GlobalHolder: "check_updates_vm clockvm default_audiovm default_dispvm default_guivm default_kernel default_netvm default_pool " +
			"default_pool_kernel default_pool_private default_pool_root default_pool_volatile default_qrexec_timeout " +
			"default_shutdown_timeout default_template management_dispvm maxmem no_cpus stats_interval updatevm",
		"RemoteVM": "icon include_in_backups klass label name qid remote_name transport_rpc uuid relayvm",
	} {
		var got string
		for i, s := range SpecsOf(class) {
			if i > 0 {
				got += " "
			}
			got += s.Name
		}
		if got != want {
			t.Errorf("%s:\n got %s\nwant %s", class, got, want)
		}
	}
	for _, p := range []string{"auto_cleanup", "dispid", "is_preload"} {
		if !HasProperty("DispVM", p) || HasProperty("AppVM", p) {
			t.Errorf("%s belongs to DispVM only", p)
		}
	}
	if HasProperty("DispVM", "template_for_dispvms") || HasProperty("TemplateVM", "template") || !HasProperty("TemplateVM", "appvm_default_bootmode") {
		t.Error("class property sets differ from docs/spec/properties.md §5")
	}
}
