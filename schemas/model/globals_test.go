package model

import (
	"reflect"
	"strings"
	"testing"

	"github.com/qubesbus/qubesbus/schemas/config"
)

// evText renders an event as "vm|name|k=v,k=v".
func evText(e Event) string {
	var kv []string
	for i := 0; i+1 < len(e.Kwargs); i += 2 {
		kv = append(kv, e.Kwargs[i]+"="+e.Kwargs[i+1])
	}
	return e.VM + "|" + e.Name + "|" + strings.Join(kv, ",")
}

func evTexts(evs []Event) []string {
	out := []string{}
	for _, e := range evs {
		out = append(out, evText(e))
	}
	return out
}

// changeCase is one write on the fixture: the events it fires (pre-events, then
// post-events when it succeeds) and the error (veto or direct) as errText renders it.
type changeCase struct {
	name    string
	running []string
	edit    func(c *config.Config) // optional change to the fixture first
	do      func(m *Model) (*Change, error)
	want    string // error
	events  []string
	check   func(t *testing.T, c *config.Config) // optional, after applying
}

func runChangeCases(t *testing.T, cases []changeCase) {
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := loadFixture(t)
			if tc.edit != nil {
				tc.edit(c)
			}
			m := New(c, DefaultHost, runtimeOf(tc.running))
			ch, err := tc.do(m)
			if err != nil {
				if got := errText(err); got != tc.want || len(tc.events) != 0 {
					t.Fatalf("error before events: %s; want %s with events %v", got, tc.want, tc.events)
				}
				return
			}
			got := evTexts(ch.Pre)
			if ch.Err == nil {
				got = append(got, evTexts(ch.Post)...)
			}
			if e := errText(ch.Err); e != tc.want {
				t.Errorf("error %q, want %q", e, tc.want)
			}
			if !reflect.DeepEqual(got, tc.events) {
				t.Fatalf("events\n got %s\nwant %s", strings.Join(got, "\n     "), strings.Join(tc.events, "\n     "))
			}
			if ch.Err == nil {
				apply(t, c, ch)
				if tc.check != nil {
					tc.check(t, c)
				}
			}
		})
	}
}

func setOn(vm, prop, payload string) func(m *Model) (*Change, error) {
	return func(m *Model) (*Change, error) {
		h := Global
		if vm != "" {
			var err error
			if h, err = m.Holder(vm); err != nil {
				return nil, err
			}
		}
		return m.Set(h, prop, []byte(payload))
	}
}

func resetOn(vm, prop string) func(m *Model) (*Change, error) {
	return func(m *Model) (*Change, error) {
		h := Global
		if vm != "" {
			var err error
			if h, err = m.Holder(vm); err != nil {
				return nil, err
			}
		}
		return m.Reset(h, prop)
	}
}

func editDomain(name string, f func(d *config.Domain)) func(c *config.Config) {
	return func(c *config.Config) {
		for i := range c.Domains {
			if c.Domains[i].Name() == name {
				f(&c.Domains[i])
			}
		}
	}
}

func tagsOf(c *config.Config, vm string) []string {
	for i := range c.Domains {
		if c.Domains[i].Name() == vm {
			return c.Domains[i].Tags
		}
	}
	return nil
}

// Qubes that follow the netvm default in the fixture, in collection order (the
// template included: qubesd walks every qube with a netvm property left unset).
var netvmFollowers = []string{"default-dvm", "fedora-41", "legacy", "personal", "untrusted"}

// netvmResets are the events property-reset:netvm fires on each follower after a
// change of default_netvm from old to now (qubesd's property-reset:netvm handler fires
// property-set:netvm first when the qube's new netvm differs from old; a template's
// default netvm is none).
func netvmResets(old, now string) []string {
	var out []string
	for _, vm := range netvmFollowers {
		n := now
		if vm == "fedora-41" {
			n = "None"
		}
		if n != old {
			out = append(out, vm+"|property-set:netvm|name=netvm,newvalue="+n+",oldvalue="+old)
		}
		out = append(out, vm+"|property-reset:netvm|name=netvm,oldvalue="+old)
	}
	return out
}

func perQube(vms []string, format string) []string {
	var out []string
	for _, vm := range vms {
		out = append(out, vm+format)
	}
	return out
}

func concat(parts ...[]string) []string {
	var out []string
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

// TestGlobalDefaultChange: a change of a global default is re-announced on every qube
// that follows it (docs/spec/properties.md §8, docs/spec/events.md §3 "global default
// change").
func TestGlobalDefaultChange(t *testing.T) {
	runChangeCases(t, []changeCase{
		{
			name: "default_netvm set",
			do:   setOn("", "default_netvm", "sys-net"),
			events: concat(
				[]string{"|property-pre-set:default_netvm|name=default_netvm,newvalue=sys-net,oldvalue=sys-firewall"},
				perQube(netvmFollowers, "|property-pre-set:netvm|name=netvm,newvalue=sys-net,oldvalue=sys-firewall"),
				netvmResets("sys-firewall", "sys-net"),
				[]string{"|property-set:default_netvm|name=default_netvm,newvalue=sys-net,oldvalue=sys-firewall"}),
		},
		{
			name: "default_netvm set to none",
			do:   setOn("", "default_netvm", ""),
			events: concat(
				[]string{"|property-pre-set:default_netvm|name=default_netvm,newvalue=None,oldvalue=sys-firewall"},
				perQube(netvmFollowers, "|property-pre-set:netvm|name=netvm,newvalue=None,oldvalue=sys-firewall"),
				netvmResets("sys-firewall", "None"),
				[]string{"|property-set:default_netvm|name=default_netvm,newvalue=None,oldvalue=sys-firewall"}),
		},
		{
			name: "default_netvm from unset",
			edit: func(c *config.Config) { c.Properties = delProp(c.Properties, "default_netvm") },
			do:   setOn("", "default_netvm", "sys-firewall"),
			events: concat(
				[]string{"|property-pre-set:default_netvm|name=default_netvm,newvalue=sys-firewall,oldvalue=None"},
				perQube(netvmFollowers, "|property-pre-set:netvm|name=netvm,newvalue=sys-firewall,oldvalue=None"),
				netvmResets("None", "sys-firewall"),
				[]string{"|property-set:default_netvm|name=default_netvm,newvalue=sys-firewall,oldvalue=None"}),
		},
		{
			// qubesd checks loops only: a qube that does not provide network is taken
			// (its followers' pre-set handlers check nothing but attaching).
			name: "default_netvm not a provider",
			do:   setOn("", "default_netvm", "work"),
			events: concat(
				[]string{"|property-pre-set:default_netvm|name=default_netvm,newvalue=work,oldvalue=sys-firewall"},
				perQube(netvmFollowers, "|property-pre-set:netvm|name=netvm,newvalue=work,oldvalue=sys-firewall"),
				netvmResets("sys-firewall", "work"),
				[]string{"|property-set:default_netvm|name=default_netvm,newvalue=work,oldvalue=sys-firewall"}),
		},
		{
			name:    "default_netvm halted while a follower runs",
			running: []string{"personal", "sys-firewall"},
			do:      setOn("", "default_netvm", "sys-net"),
			want:    "QubesVMNotStartedError: Cannot dynamically attach to stopped qube sys-net",
			events: []string{
				"|property-pre-set:default_netvm|name=default_netvm,newvalue=sys-net,oldvalue=sys-firewall",
				"default-dvm|property-pre-set:netvm|name=netvm,newvalue=sys-net,oldvalue=sys-firewall",
				"fedora-41|property-pre-set:netvm|name=netvm,newvalue=sys-net,oldvalue=sys-firewall",
				"legacy|property-pre-set:netvm|name=netvm,newvalue=sys-net,oldvalue=sys-firewall",
				"personal|property-pre-set:netvm|name=netvm,newvalue=sys-net,oldvalue=sys-firewall",
			},
		},
		{
			// The loop check is qubesd's setter: it fails before any event.
			name: "default_netvm loop on a template that follows the default",
			do:   setOn("", "default_netvm", "fedora-41"),
			want: "QubesPropertyValueError: Network loop on 'fedora-41'",
		},
		{
			// qubesd has no handler for the reset of default_netvm.
			name: "default_netvm reset",
			do:   resetOn("", "default_netvm"),
			events: []string{
				"|property-pre-reset:default_netvm|name=default_netvm,oldvalue=sys-firewall",
				"|property-pre-del:default_netvm|name=default_netvm,oldvalue=sys-firewall",
				"|property-reset:default_netvm|name=default_netvm,oldvalue=sys-firewall",
				"|property-del:default_netvm|name=default_netvm,oldvalue=sys-firewall",
			},
		},
		{
			// sys-net follows default_guivm and its keyboard_layout its GUI qube's:
			// qubesd takes it and then cannot read that layout (issue 15, class 8).
			name: "default_guivm set to a qube that follows it",
			do:   setOn("", "default_guivm", "sys-net"),
			want: "QubesValueError: Loops of GUI qubes are unsupported: keyboard_layout of qube 'sys-net' would follow itself",
		},
		{
			// Every qube but dom0 follows default_guivm: each gets its tags moved and
			// property-set:guivm re-fired.
			// sys-net's own keyboard_layout keeps it from following itself.
			name: "default_guivm set",
			edit: func(c *config.Config) {
				editDomain("work", func(d *config.Domain) {
					d.Properties = append(d.Properties, config.Property{Name: "guivm", Value: "dom0"})
				})(c)
				editDomain("sys-net", func(d *config.Domain) {
					d.Properties = append(d.Properties, config.Property{Name: "keyboard_layout", Value: "us++"})
				})(c)
			},
			do: setOn("", "default_guivm", "sys-net"),
			events: concat(
				[]string{"|property-pre-set:default_guivm|name=default_guivm,newvalue=sys-net,oldvalue=dom0"},
				func() []string {
					var out []string
					for _, vm := range []string{"default-dvm", "fedora-41", "legacy", "personal", "sys-firewall", "sys-net", "untrusted"} {
						out = append(out,
							vm+"|domain-tag-delete:guivm-dom0|tag=guivm-dom0",
							vm+"|domain-tag-add:guivm-sys-net|tag=guivm-sys-net",
							vm+"|property-set:guivm|name=guivm,newvalue=sys-net,oldvalue=dom0")
					}
					return out
				}(),
				[]string{"|property-set:default_guivm|name=default_guivm,newvalue=sys-net,oldvalue=dom0"}),
			check: func(t *testing.T, c *config.Config) {
				if got := tagsOf(c, "personal"); !reflect.DeepEqual(got, []string{"backup", "audiovm-dom0", "guivm-sys-net"}) {
					t.Errorf("personal tags %v", got)
				}
				if got := tagsOf(c, "work"); !reflect.DeepEqual(got, []string{"work-tag", "backup", "audiovm-dom0", "guivm-dom0"}) {
					t.Errorf("work (explicit guivm) tags %v", got)
				}
				m := New(c, DefaultHost, nil)
				h, _ := m.Holder("personal")
				if r, err := m.Get(h, "guivm"); err != nil || r.Value.String() != "sys-net" || !r.Default {
					t.Errorf("personal guivm: %v (default %v), %v", r.Value, r.Default, err)
				}
			},
		},
		{
			name: "default_audiovm set to none",
			edit: func(c *config.Config) {
				for i := range c.Domains {
					if n := c.Domains[i].Name(); n != "dom0" && n != "legacy" {
						c.Domains[i].Properties = append(c.Domains[i].Properties, config.Property{Name: "audiovm", Value: "dom0"})
					}
				}
			},
			do: setOn("", "default_audiovm", ""),
			events: []string{
				"|property-pre-set:default_audiovm|name=default_audiovm,newvalue=None,oldvalue=dom0",
				"legacy|domain-tag-delete:audiovm-dom0|tag=audiovm-dom0",
				"legacy|property-set:audiovm|name=audiovm,newvalue=None,oldvalue=dom0",
				"|property-set:default_audiovm|name=default_audiovm,newvalue=None,oldvalue=dom0",
			},
		},
		{
			// qubesd re-fires property-set:guivm only on set, not on reset.
			name: "default_guivm reset",
			do:   resetOn("", "default_guivm"),
			events: []string{
				"|property-pre-reset:default_guivm|name=default_guivm,oldvalue=dom0",
				"|property-pre-del:default_guivm|name=default_guivm,oldvalue=dom0",
				"|property-reset:default_guivm|name=default_guivm,oldvalue=dom0",
				"|property-del:default_guivm|name=default_guivm,oldvalue=dom0",
			},
		},
		{
			// default_dispvm: "set/reset fires property-reset:default_dispvm on every
			// qube (dom0 included) that uses the default"; the handler's events precede
			// the global property-reset.
			name: "default_dispvm reset",
			do:   resetOn("", "default_dispvm"),
			events: concat(
				[]string{
					"|property-pre-reset:default_dispvm|name=default_dispvm,oldvalue=default-dvm",
					"|property-pre-del:default_dispvm|name=default_dispvm,oldvalue=default-dvm",
				},
				perQube([]string{"dom0", "default-dvm", "fedora-41", "legacy", "personal", "sys-firewall", "sys-net", "untrusted", "work"},
					"|property-reset:default_dispvm|name=default_dispvm,oldvalue=default-dvm"),
				[]string{
					"|property-reset:default_dispvm|name=default_dispvm,oldvalue=default-dvm",
					"|property-del:default_dispvm|name=default_dispvm,oldvalue=default-dvm",
				}),
		},
		{
			// Globals no qube property follows by default fire nothing extra.
			name: "default_template set",
			do:   setOn("", "default_template", "fedora-41"),
			events: []string{
				"|property-pre-set:default_template|name=default_template,newvalue=fedora-41,oldvalue=fedora-41",
				"|property-set:default_template|name=default_template,newvalue=fedora-41,oldvalue=fedora-41",
			},
		},
	})
}

// withDisp adds disposable disp7 based on default-dvm.
func withDisp(c *config.Config) {
	c.Domains = append(c.Domains, config.Domain{ID: "domain-20", Class: "DispVM", Properties: []config.Property{
		{Name: "label", Value: "red"}, {Name: "name", Value: "disp7"}, {Name: "qid", Value: "20"},
		{Name: "uuid", Value: "0b0b0b0b-0000-4000-8000-000000000020"}, {Name: "dispid", Value: "7"},
		{Name: "template", Value: "default-dvm"}}})
}

// TestTemplateVetoRunningDisposables: docs/spec/properties.md §5 template (A):
// "disposable template with running disposables → QubesVMInUseError" with a tuple-repr
// message, after the not-Halted check.
func TestTemplateVetoRunningDisposables(t *testing.T) {
	const inUse = "QubesVMInUseError: ('Cannot change template while there are running disposables based on this disposable template',)"
	pre := []string{"default-dvm|property-pre-set:template|name=template,newvalue=fedora-41,oldvalue=fedora-41"}
	post := []string{"default-dvm|property-set:template|name=template,newvalue=fedora-41,oldvalue=fedora-41"}
	runChangeCases(t, []changeCase{
		{name: "running disposable", edit: withDisp, running: []string{"disp7"},
			do: setOn("default-dvm", "template", "fedora-41"), want: inUse, events: pre},
		{name: "paused disposable", edit: withDisp, running: []string{"disp7"},
			do: func(m *Model) (*Change, error) {
				m.runtime = func(n string) Runtime {
					if n == "disp7" {
						return Runtime{State: "Paused", XID: 3, StubdomXID: -1}
					}
					return Halted
				}
				return setOn("default-dvm", "template", "fedora-41")(m)
			}, want: inUse, events: pre},
		{name: "halted disposable", edit: withDisp,
			do: setOn("default-dvm", "template", "fedora-41"), events: append(append([]string{}, pre...), post...)},
		{name: "the template itself runs first", edit: withDisp, running: []string{"disp7", "default-dvm"},
			do: setOn("default-dvm", "template", "fedora-41"), want: "QubesVMNotHaltedError: Cannot change template while qube is running", events: pre},
		{name: "other qube unaffected", edit: withDisp, running: []string{"disp7"},
			do: setOn("work", "template", "fedora-41"),
			events: []string{
				"work|property-pre-set:template|name=template,newvalue=fedora-41,oldvalue=fedora-41",
				"work|property-set:template|name=template,newvalue=fedora-41,oldvalue=fedora-41",
			}},
		{name: "disposable's own template", edit: withDisp,
			do: setOn("disp7", "template", "default-dvm"),
			events: []string{
				"disp7|property-pre-set:template|name=template,newvalue=default-dvm,oldvalue=default-dvm",
				"disp7|property-set:template|name=template,newvalue=default-dvm,oldvalue=default-dvm",
			}},
	})
}

func volumePool(t *testing.T, c *config.Config, vm, vol string) string {
	t.Helper()
	for i := range c.Domains {
		if c.Domains[i].Name() != vm {
			continue
		}
		for _, line := range strings.Split(string(c.Domains[i].VolumeConfig), "\n") {
			if strings.Contains(line, `name="`+vol+`"`) {
				_, rest, _ := strings.Cut(line, `pool="`)
				p, _, _ := strings.Cut(rest, `"`)
				return p
			}
		}
	}
	t.Fatalf("%s has no volume %s", vm, vol)
	return ""
}

// TestCreateInPoolSnapshotVolumes: docs/spec/methods.md §1.1 step 7 "pool:root for an
// AppVM fails (root belongs to the template)"; storage creation fails after the qube was
// added, so qubesd removes it again (step 8) and saves nothing.
func TestCreateInPoolSnapshotVolumes(t *testing.T) {
	create := func(class, arg, payload string) func(m *Model) (*Change, error) {
		return func(m *Model) (*Change, error) {
			return m.Create(CreateRequest{Class: class, InPool: true, Arg: arg, Payload: []byte(payload), Source: "dom0",
				UUID: "0b0b0b0b-0000-4000-8000-000000000099"})
		}
	}
	added := []string{
		"|domain-add|vm=new",
		"new|domain-tag-add:created-by-dom0|tag=created-by-dom0",
	}
	removed := []string{"|domain-pre-delete|vm=new", "|domain-delete|vm=new"}
	ok := append(append([]string{}, added...), "new|domain-create-on-disk|")
	runChangeCases(t, []changeCase{
		{name: "AppVM pool:root", do: create("AppVM", "", "name=new label=red pool:root=linux-kernel"),
			want:   "QubesException: Snapshot volume root must be in the same pool as its origin (root volume of template),cannot move to pool linux-kernel ",
			events: concat(added, removed)},
		{name: "AppVM pool:root and pool:private", do: create("AppVM", "fedora-41", "name=new label=red pool:private=linux-kernel pool:root=linux-kernel"),
			want:   "QubesException: Snapshot volume root must be in the same pool as its origin (root volume of template),cannot move to pool linux-kernel ",
			events: concat(added, removed)},
		{name: "AppVM unknown pool first", do: create("AppVM", "", "name=new label=red pool:root=nope"),
			want: "QubesException: Unknown storage pool nope"},
		{name: "DispVM pool:private", do: create("DispVM", "", "name=new label=red pool:private=linux-kernel"),
			want:   "QubesException: Snapshot volume private must be in the same pool as its origin (private volume of template),cannot move to pool linux-kernel ",
			events: concat(added, removed)},
		{name: "AppVM pool:private", do: create("AppVM", "", "name=new label=red pool:private=linux-kernel"),
			events: ok,
			check: func(t *testing.T, c *config.Config) {
				if p := volumePool(t, c, "new", "private"); p != "linux-kernel" {
					t.Errorf("private in %s", p)
				}
			}},
		{name: "TemplateVM pool:root", do: create("TemplateVM", "", "name=new label=red pool:root=linux-kernel"),
			events: ok,
			check: func(t *testing.T, c *config.Config) {
				if p := volumePool(t, c, "new", "root"); p != "linux-kernel" {
					t.Errorf("root in %s", p)
				}
			}},
		{name: "AppVM pool= leaves the snapshot and the kernel", do: create("AppVM", "", "name=new label=red pool=other"),
			edit: func(c *config.Config) {
				c.Pools = append(c.Pools, config.Pool{Attrs: []config.Attr{{Name: "name", Value: "other"},
					{Name: "dir_path", Value: "/srv/other"}, {Name: "driver", Value: "file"}}})
			},
			events: ok,
			check: func(t *testing.T, c *config.Config) {
				for vol, want := range map[string]string{"root": "varlibqubes", "private": "other", "volatile": "other", "kernel": "linux-kernel"} {
					if p := volumePool(t, c, "new", vol); p != want {
						t.Errorf("%s in %s, want %s", vol, p, want)
					}
				}
			}},
	})
}
