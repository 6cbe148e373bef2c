package model

import (
	"testing"

	"github.com/qubesbus/qubesbus/schemas/config"
)

func featureSetOn(vm, name, value string) func(m *Model) (*Change, error) {
	return func(m *Model) (*Change, error) {
		return m.FeatureSet(m.Domain(vm), name, []byte(value))
	}
}

// preloadRPCs gives vm the two RPCs qubesd's supports_preload asks for.
func preloadRPCs(vm string) func(c *config.Config) {
	return edits(setFeature(vm, "supported-rpc.qubes.WaitForRunningSystem", "1"), setFeature(vm, "supported-rpc.qubes.WaitForSession", "1"))
}

func setFeature(vm, name, value string) func(c *config.Config) {
	return editDomain(vm, func(d *config.Domain) {
		for i := range d.Features {
			if d.Features[i].Name == name {
				d.Features[i].Value = value
				return
			}
		}
		d.Features = append(d.Features, config.Feature{Name: name, Value: value})
	})
}

// TestFeaturePreloadDispvmMax: qubesd's DVMTemplateMixin pre-set handler (AppVM and
// StandaloneVM) checks qrexec, then supports_preload, then the digits, all after the
// pre-set event; other classes take any value.
func TestFeaturePreloadDispvmMax(t *testing.T) {
	pre := func(vm, value string) string {
		return vm + "|domain-feature-pre-set:preload-dispvm-max|feature=preload-dispvm-max,value=" + value
	}
	set := func(vm, value string) string {
		return vm + "|domain-feature-set:preload-dispvm-max|feature=preload-dispvm-max,value=" + value
	}
	runChangeCases(t, []changeCase{
		{
			// qrexec comes from the template; both RPCs are missing.
			name:   "template lacks the RPCs",
			do:     featureSetOn("default-dvm", "preload-dispvm-max", "2"),
			want:   "QubesValueError: Qube does not support the RPC(s) 'qubes.WaitForRunningSystem, qubes.WaitForSession'",
			events: []string{pre("default-dvm", "2")},
		},
		{
			// qrexec is checked first, even for an invalid value.
			name:   "no qrexec",
			edit:   setFeature("legacy", "qrexec", ""),
			do:     featureSetOn("legacy", "preload-dispvm-max", "x"),
			want:   "QubesValueError: Qube does not support qrexec",
			events: []string{pre("legacy", "x")},
		},
		{
			name:   "RPCs before digits",
			do:     featureSetOn("legacy", "preload-dispvm-max", "x"),
			want:   "QubesValueError: Qube does not support the RPC(s) 'qubes.WaitForRunningSystem, qubes.WaitForSession'",
			events: []string{pre("legacy", "x")},
		},
		{
			// The message names the missing ones only.
			name:   "one RPC missing",
			edit:   setFeature("fedora-41", "supported-rpc.qubes.WaitForRunningSystem", "1"),
			do:     featureSetOn("default-dvm", "preload-dispvm-max", "2"),
			want:   "QubesValueError: Qube does not support the RPC(s) 'qubes.WaitForSession'",
			events: []string{pre("default-dvm", "2")},
		},
		{
			name:   "not a digit",
			edit:   preloadRPCs("fedora-41"),
			do:     featureSetOn("default-dvm", "preload-dispvm-max", "-1"),
			want:   "QubesValueError: Invalid preload-dispvm-max value: not a digit",
			events: []string{pre("default-dvm", "-1")},
		},
		{
			// A disposable template starts preloading after the event (dom0 has no
			// preload-dispvm-max of its own to rule it).
			name: "digits",
			edit: preloadRPCs("fedora-41"),
			do:   featureSetOn("default-dvm", "preload-dispvm-max", "2"),
			events: []string{pre("default-dvm", "2"), set("default-dvm", "2"),
				"default-dvm|domain-preload-dispvm-start|reason=local feature was set to '2'"},
		},
		{
			// Empty counts as "0".
			name:   "empty",
			edit:   preloadRPCs("legacy"),
			do:     featureSetOn("legacy", "preload-dispvm-max", ""),
			events: []string{pre("legacy", ""), set("legacy", "")},
		},
		{
			// TemplateVM is no DVMTemplateMixin: no handler.
			name:   "template qube unchecked",
			do:     featureSetOn("fedora-41", "preload-dispvm-max", "x"),
			events: []string{pre("fedora-41", "x"), set("fedora-41", "x")},
		},
	})
}

// TestGlobalSetOrder: which global checks fail before any event (setters) and which
// after property-pre-set (pre-set handlers).
func TestGlobalSetOrder(t *testing.T) {
	followDefault := func(c *config.Config) {
		editDomain("sys-firewall", func(d *config.Domain) { d.Properties = delProp(d.Properties, "netvm") })(c)
	}
	runChangeCases(t, []changeCase{
		{
			// _setter_default_netvm: no event at all.
			name: "default_netvm loop is a setter",
			edit: followDefault,
			do:   setOn("", "default_netvm", "sys-firewall"),
			want: "QubesPropertyValueError: Network loop on 'sys-firewall'",
		},
		{
			name: "default_kernel missing after pre-set",
			do:   setOn("", "default_kernel", "5.0"),
			want: "QubesPropertyValueError: Kernel '5.0' not installed",
			events: []string{
				"|property-pre-set:default_kernel|name=default_kernel,newvalue=5.0,oldvalue=6.12.40-1.fc41",
			},
		},
		{
			// No '/' rule for the global: the name is just not installed.
			name: "default_kernel slash",
			do:   setOn("", "default_kernel", "../x"),
			want: "QubesPropertyValueError: Kernel '../x' not installed",
			events: []string{
				"|property-pre-set:default_kernel|name=default_kernel,newvalue=../x,oldvalue=6.12.40-1.fc41",
			},
		},
		{
			name: "default_kernel empty",
			do:   setOn("", "default_kernel", ""),
			events: []string{
				"|property-pre-set:default_kernel|name=default_kernel,newvalue=,oldvalue=6.12.40-1.fc41",
				"|property-set:default_kernel|name=default_kernel,newvalue=,oldvalue=6.12.40-1.fc41",
			},
		},
		{
			name: "default_kernel installed",
			do:   setOn("", "default_kernel", "6.12.40-1.fc41"),
			events: []string{
				"|property-pre-set:default_kernel|name=default_kernel,newvalue=6.12.40-1.fc41,oldvalue=6.12.40-1.fc41",
				"|property-set:default_kernel|name=default_kernel,newvalue=6.12.40-1.fc41,oldvalue=6.12.40-1.fc41",
			},
		},
		{
			// The qube kernel keeps its setter: '/' fails before any event.
			name: "qube kernel slash is a setter",
			do:   setOn("work", "kernel", "../x"),
			want: "QubesPropertyValueError: Kernel name cannot contain '/'",
		},
		{
			// Per-qube events of a global default_dispvm set carry the old value.
			name: "default_dispvm set passes oldvalue",
			edit: editDomain("work", func(d *config.Domain) {
				d.Properties = append(d.Properties, config.Property{Name: "default_dispvm", Value: "default-dvm"})
			}),
			do: setOn("", "default_dispvm", ""),
			events: concat(
				[]string{"|property-pre-set:default_dispvm|name=default_dispvm,newvalue=None,oldvalue=default-dvm"},
				perQube([]string{"dom0", "default-dvm", "fedora-41", "legacy", "personal", "sys-firewall", "sys-net", "untrusted"},
					"|property-reset:default_dispvm|name=default_dispvm,oldvalue=default-dvm"),
				[]string{"|property-set:default_dispvm|name=default_dispvm,newvalue=None,oldvalue=default-dvm"}),
		},
		{
			name: "default_dispvm set from unset",
			edit: func(c *config.Config) { c.Properties = delProp(c.Properties, "default_dispvm") },
			do:   setOn("", "default_dispvm", "default-dvm"),
			events: concat(
				[]string{"|property-pre-set:default_dispvm|name=default_dispvm,newvalue=default-dvm,oldvalue=None"},
				perQube([]string{"dom0", "default-dvm", "fedora-41", "legacy", "personal", "sys-firewall", "sys-net", "untrusted", "work"},
					"|property-reset:default_dispvm|name=default_dispvm,oldvalue=None"),
				[]string{"|property-set:default_dispvm|name=default_dispvm,newvalue=default-dvm,oldvalue=None"}),
		},
	})
}

func setGlobal(name, value string) func(c *config.Config) {
	return func(c *config.Config) {
		for i := range c.Properties {
			if c.Properties[i].Name == name {
				c.Properties[i].Value = value
				return
			}
		}
		c.Properties = append(c.Properties, config.Property{Name: name, Value: value})
	}
}

func edits(fs ...func(c *config.Config)) func(c *config.Config) {
	return func(c *config.Config) {
		for _, f := range fs {
			f(c)
		}
	}
}

// TestFeaturePreloadDispvmDelay: DVMTemplateMixin (AppVM, StandaloneVM) checks the
// delay as Python's float() after the pre-set event, unless the value is unchanged;
// dom0 checks it too; other classes take any value.
func TestFeaturePreloadDispvmDelay(t *testing.T) {
	const bad = "QubesValueError: Invalid preload-dispvm-delay value: not an integer or float"
	ev := func(kind, vm, value string, old ...string) string {
		s := vm + "|domain-feature-" + kind + ":preload-dispvm-delay|feature=preload-dispvm-delay,value=" + value
		for _, o := range old {
			s += ",oldvalue=" + o
		}
		return s
	}
	var cases []changeCase
	for _, v := range []string{"1", "-2.5", "1e3", " 7 ", "+.5", "1_000", "inf", "-Infinity", "NaN", "3.", ""} {
		cases = append(cases, changeCase{
			name:   "AppVM accepts " + v,
			do:     featureSetOn("default-dvm", "preload-dispvm-delay", v),
			events: []string{ev("pre-set", "default-dvm", v), ev("set", "default-dvm", v)},
		})
	}
	for _, v := range []string{"x", ".", "1__0", "_1", "1_", "0x10", "1e", "1.2.3", "infinit"} {
		cases = append(cases, changeCase{
			name:   "AppVM rejects " + v,
			do:     featureSetOn("default-dvm", "preload-dispvm-delay", v),
			want:   bad,
			events: []string{ev("pre-set", "default-dvm", v)},
		})
	}
	cases = append(cases,
		changeCase{
			name:   "StandaloneVM rejects",
			do:     featureSetOn("legacy", "preload-dispvm-delay", "soon"),
			want:   bad,
			events: []string{ev("pre-set", "legacy", "soon")},
		},
		changeCase{
			// qubesd returns early when the value equals the old one.
			name: "unchanged invalid value passes",
			edit: setFeature("default-dvm", "preload-dispvm-delay", "x"),
			do:   featureSetOn("default-dvm", "preload-dispvm-delay", "x"),
			events: []string{ev("pre-set", "default-dvm", "x", "x"),
				ev("set", "default-dvm", "x", "x")},
		},
		changeCase{
			name:   "changed from an invalid value",
			edit:   setFeature("default-dvm", "preload-dispvm-delay", "x"),
			do:     featureSetOn("default-dvm", "preload-dispvm-delay", "y"),
			want:   bad,
			events: []string{ev("pre-set", "default-dvm", "y", "x")},
		},
		changeCase{
			name:   "TemplateVM unchecked",
			do:     featureSetOn("fedora-41", "preload-dispvm-delay", "x"),
			events: []string{ev("pre-set", "fedora-41", "x"), ev("set", "fedora-41", "x")},
		},
		changeCase{
			name:   "dom0 still checks",
			do:     featureSetOn("dom0", "preload-dispvm-delay", "x"),
			want:   bad,
			events: []string{ev("pre-set", "dom0", "x")},
		},
	)
	runChangeCases(t, cases)
}

// TestFeatureGlobalPreloadDispvmMax: dom0's preload-dispvm-max pre-set handler fires the
// same pre-event, with dom0's kwargs, on the global default_dispvm, whose checks then
// run; not when the value is unchanged or there is no default_dispvm.
func TestFeatureGlobalPreloadDispvmMax(t *testing.T) {
	ev := func(kind, vm, value string, old ...string) string {
		s := vm + "|domain-feature-" + kind + ":preload-dispvm-max|feature=preload-dispvm-max,value=" + value
		for _, o := range old {
			s += ",oldvalue=" + o
		}
		return s
	}
	runChangeCases(t, []changeCase{
		{
			// dom0's handler passes oldvalue on: None when dom0 had none.
			name: "default_dispvm lacks the RPCs",
			do:   featureSetOn("dom0", "preload-dispvm-max", "2"),
			want: "QubesValueError: Qube does not support the RPC(s) 'qubes.WaitForRunningSystem, qubes.WaitForSession'",
			events: []string{ev("pre-set", "dom0", "2"),
				ev("pre-set", "default-dvm", "2", "None")},
		},
		{
			name: "not a digit on the default_dispvm",
			edit: preloadRPCs("fedora-41"),
			do:   featureSetOn("dom0", "preload-dispvm-max", "x"),
			want: "QubesValueError: Invalid preload-dispvm-max value: not a digit",
			events: []string{ev("pre-set", "dom0", "x"),
				ev("pre-set", "default-dvm", "x", "None")},
		},
		{
			// The default_dispvm starts preloading after the event.
			name: "accepted, oldvalue passed on",
			edit: edits(preloadRPCs("fedora-41"), setFeature("dom0", "preload-dispvm-max", "1")),
			do:   featureSetOn("dom0", "preload-dispvm-max", "3"),
			events: []string{ev("pre-set", "dom0", "3", "1"),
				ev("pre-set", "default-dvm", "3", "1"),
				ev("set", "dom0", "3", "1"),
				"default-dvm|domain-preload-dispvm-start|reason=global feature was set to '3'"},
		},
		{
			// Unchanged: dom0's handler returns before re-firing.
			name:   "unchanged",
			edit:   setFeature("dom0", "preload-dispvm-max", "x"),
			do:     featureSetOn("dom0", "preload-dispvm-max", "x"),
			events: []string{ev("pre-set", "dom0", "x", "x"), ev("set", "dom0", "x", "x")},
		},
		{
			name:   "no default_dispvm",
			edit:   setGlobal("default_dispvm", ""),
			do:     featureSetOn("dom0", "preload-dispvm-max", "x"),
			events: []string{ev("pre-set", "dom0", "x"), ev("set", "dom0", "x")},
		},
		{
			// A default_dispvm that is no DVMTemplateMixin has no handler: streamed only.
			name: "default_dispvm without the handler",
			edit: setGlobal("default_dispvm", "fedora-41"),
			do:   featureSetOn("dom0", "preload-dispvm-max", "x"),
			events: []string{ev("pre-set", "dom0", "x"), ev("pre-set", "fedora-41", "x", "None"),
				ev("set", "dom0", "x"),
				"fedora-41|domain-preload-dispvm-start|reason=global feature was set to 'x'"},
		},
		{
			// Another qube's preload-dispvm-max is not re-fired.
			name:   "only dom0 re-fires",
			edit:   preloadRPCs("legacy"),
			do:     featureSetOn("legacy", "preload-dispvm-max", "1"),
			events: []string{ev("pre-set", "legacy", "1"), ev("set", "legacy", "1")},
		},
	})
}
