package model

import (
	"slices"
	"strings"

	"github.com/qubesbus/qubesbus/bus/qerr"
)

type defaultFn = func(m *Model, h Holder) (Value, bool)

func static(v Value) defaultFn { return func(*Model, Holder) (Value, bool) { return v, true } }

func fromGlobal(prop string) defaultFn {
	return func(m *Model, _ Holder) (Value, bool) { return m.Value(Global, prop) }
}

// withTemplate is the template's value when the qube has a template that has a value,
// else the fallback.
func withTemplate(prop string, fallback defaultFn) defaultFn {
	return func(m *Model, h Holder) (Value, bool) {
		if t := m.Template(h.D); t != nil {
			if v, ok := m.Value(Holder{D: t}, prop); ok {
				return v, true
			}
		}
		return fallback(m, h)
	}
}

// runtimeInt reads a value owned by the lifecycle service.
func runtimeInt(f func(Runtime) int) defaultFn {
	return func(m *Model, h Holder) (Value, bool) { return Int(f(m.Runtime(h.D.Name()))), true }
}

func propErr(msg string) error { return qerr.PropertyValueError(msg) }

func positive(name string) func(*Model, Holder, Value) (Value, error) {
	return func(_ *Model, _ Holder, v Value) (Value, error) {
		if IntSign(v.Text) <= 0 {
			return v, propErr(name + " must be positive")
		}
		return v, nil
	}
}

const (
	dnsServers  = "10.139.1.1 10.139.1.2"
	defaultMAC  = "00:16:3e:5e:6c:00"
	usernameSet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-+,."
	// defaultKernelopts is qubesd's built-in kernel command line for qubes without
	// PCI devices (kernels may ship their own; the simulated host has none).
	defaultKernelOpts = "swiotlb=2048"
)

func isMAC(s string) bool {
	if len(s) != 17 {
		return false
	}
	for i := 0; i < 17; i++ {
		c := s[i]
		if i%3 == 2 {
			if c != ':' {
				return false
			}
		} else if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

func init() {
	defineQubeProperties()
	defineAdminVMProperties()
	defineRemoteVMProperties()
	defineGlobalProperties()
	sortSpecs()
}

func defineQubeProperties() {
	define("ATSD", Spec{Name: "audiovm", Type: "vm", Kind: KindVM, Stage: 4, AllowNone: true,
		Help:    "Qube that provides audio to this qube; none for no audio.",
		Default: fromGlobal("default_audiovm"), Side: tagSync("audiovm"), ResetSide: tagSyncReset("audiovm")})
	define("D", Spec{Name: "auto_cleanup", Type: "bool", Kind: KindBool, Stage: 2,
		Help:    "Remove this disposable automatically when it stops.",
		Default: static(Bool(false))})
	define("ATSD", Spec{Name: "autostart", Type: "bool", Kind: KindBool, Stage: 2,
		Help:    "Start this qube when the system boots.",
		Default: static(Bool(false))})
	define("ATSD", Spec{Name: "backup_timestamp", Type: "int", Kind: KindInt, Stage: 2,
		Help:    "Time of the last backup of this qube, in seconds since the epoch.",
		Default: static(None)})
	define("ATSD", Spec{Name: "bootmode", Type: "str", Kind: KindStr, Stage: 4,
		Help:    "Boot mode: selects extra kernel options offered by the template's boot-mode features.",
		Default: defaultBootmode})
	define("ATSD", Spec{Name: "debug", Type: "bool", Kind: KindBool, Stage: 2,
		Help:    "Turn on debugging aids (for example, keep the console and verbose logs).",
		Default: static(Bool(false))})
	define("ATS0", Spec{Name: "default_dispvm", Type: "vm", Kind: KindVM, Stage: 4, AllowNone: true,
		Help:    "Disposable template used when this qube asks for a disposable.",
		Default: fromGlobal("default_dispvm"), Setter: dispvmSetter("default_dispvm")})
	define("D", Spec{Name: "default_dispvm", Type: "vm", Kind: KindVM, Stage: 4, AllowNone: true,
		Help: "Disposable template used when this qube asks for a disposable.",
		Default: func(m *Model, h Holder) (Value, bool) {
			return m.Value(h, "template")
		}, Setter: dispvmSetter("default_dispvm")})
	define("ATSD", Spec{Name: "default_user", Type: "str", Kind: KindStr, Stage: 2,
		Help:    "User that runs commands in this qube unless another is asked for.",
		Default: withTemplate("default_user", static(Text("user"))),
		Setter: func(_ *Model, _ Holder, v Value) (Value, error) {
			for i := 0; i < len(v.Text); i++ {
				if !strings.ContainsRune(usernameSet, rune(v.Text[i])) {
					return v, propErr("Username can contain only those characters: " + usernameSet)
				}
			}
			return v, nil
		}, Side: templateChildReset("default_user")})
	define("ATSD0", Spec{Name: "devices_denied", Type: "str", Kind: KindStr, Stage: 2,
		Help:    "Device interface classes never attached to this qube, as 7-character codes.",
		Default: static(Text("")), Setter: devicesDeniedSetter})
	define("D", Spec{Name: "dispid", Type: "int", Kind: KindInt, Stage: 2, WriteOnce: true,
		Help: "Number of this disposable, unique among disposables; chosen at creation."})
	define("ATSD", Spec{Name: "dns", Type: "str", Kind: KindStr, Stage: 2, ReadOnly: true,
		Help: "DNS servers this qube uses; set only when it is networked.",
		Default: func(m *Model, h Holder) (Value, bool) {
			if m.NetVM(h.D) != nil || m.ProvidesNetwork(h.D) {
				return Text(dnsServers), true
			}
			return None, true
		}})
	define("ATSD", Spec{Name: "gateway", Type: "str", Kind: KindStr, Stage: 2, ReadOnly: true,
		Help: "Gateway address this qube offers to the qubes it provides network to.",
		Default: func(m *Model, h Holder) (Value, bool) {
			if m.ProvidesNetwork(h.D) {
				return m.Value(h, "visible_ip")
			}
			return None, true
		}})
	define("ATSD", Spec{Name: "gateway6", Type: "str", Kind: KindStr, Stage: 2, ReadOnly: true,
		Help: "IPv6 gateway address this qube offers to the qubes it provides network to.",
		Default: func(m *Model, h Holder) (Value, bool) {
			if m.ProvidesNetwork(h.D) && m.ipv6Enabled(h.D) {
				return m.Value(h, "visible_ip6")
			}
			return None, true
		}})
	define("ATSD", Spec{Name: "guivm", Type: "vm", Kind: KindVM, Stage: 4, AllowNone: true,
		Help:    "Qube that runs the graphical interface for this qube; none for no GUI.",
		Default: fromGlobal("default_guivm"), Setter: layoutLoopSetter("guivm"), ResetCheck: layoutLoopResetCheck("guivm"),
		Side: tagSync("guivm"), ResetSide: tagSyncReset("guivm")})
	define("ATSDR", Spec{Name: "icon", Type: "str", Kind: KindStr, Stage: 2, ReadOnly: true,
		Help:    "Name of the icon shown for this qube, derived from its class and label.",
		Default: defaultIcon})
	define("ATS", Spec{Name: "include_in_backups", Type: "bool", Kind: KindBool, Stage: 2,
		Help:    "Include this qube in backups by default.",
		Default: static(Bool(true))})
	define("D", Spec{Name: "include_in_backups", Type: "bool", Kind: KindBool, Stage: 2,
		Help: "Include this qube in backups by default.",
		Default: func(m *Model, h Holder) (Value, bool) {
			return Bool(!m.Bool(h, "auto_cleanup")), true
		}})
	define("ATSD", Spec{Name: "installed_by_rpm", Type: "bool", Kind: KindBool, Stage: 2,
		Help:    "This qube was installed by the package manager (it then cannot be removed here).",
		Default: static(Bool(false))})
	define("ATSD", Spec{Name: "ip", Type: "str", Kind: KindIPv4, Stage: 2,
		Help: "IPv4 address of this qube; derived from its number when networked.",
		Default: func(m *Model, h Holder) (Value, bool) {
			if !m.IsNetworked(h.D) {
				return None, true
			}
			return m.ipFor(h.D), true
		}, Side: ipSide(""), ResetSide: ipResetSide})
	define("ATSD", Spec{Name: "ip6", Type: "str", Kind: KindIPv6, Stage: 2,
		Help: "IPv6 address of this qube; set when networked with the ipv6 feature on.",
		Default: func(m *Model, h Holder) (Value, bool) {
			if !m.IsNetworked(h.D) || !m.ipv6Enabled(h.D) {
				return None, true
			}
			return m.ip6For(h.D), true
		}, Side: ipSide("6")})
	define("D", Spec{Name: "is_preload", Type: "bool", Kind: KindBool, Stage: 2, ReadOnly: true,
		Help: "This disposable was started in advance and waits to be used.",
		Default: func(m *Model, h Holder) (Value, bool) {
			if t := m.Template(h.D); t != nil {
				if v, ok := Feature(t, "preload-dispvm"); ok && slices.Contains(strings.Fields(v), h.D.Name()) {
					return Bool(true), true
				}
			}
			return Bool(false), true
		}})
	define("ATSD", Spec{Name: "kernel", Type: "str", Kind: KindStr, Stage: 2,
		Help:    "Kernel this qube boots (a directory under vm-kernels); empty for the qube's own kernel.",
		Default: withTemplate("kernel", fromGlobal("default_kernel")),
		Setter:  kernelSetter, Veto: kernelVeto, Side: templateChildReset("kernel")})
	define("ATSD", Spec{Name: "kernelopts", Type: "str", Kind: KindStr, Stage: 4,
		Help:    "Kernel command line options of this qube.",
		Default: defaultKernelopts,
		Setter: func(_ *Model, _ Holder, v Value) (Value, error) {
			if len(v.Text) > 512 {
				return v, propErr("Kernelopts value too long (512 chars max)")
			}
			return v, nil
		}, Side: templateChildReset("kernelopts")})
	define("ATSD", Spec{Name: "keyboard_layout", Type: "str", Kind: KindStr, Stage: 2,
		Help: "Keyboard layout as layout+variant+options; follows the GUI qube by default.",
		Default: func(m *Model, h Holder) (Value, bool) {
			if g := m.Ref(h, "guivm"); g != nil && HasProperty(g.Class, "keyboard_layout") {
				if v, ok := m.Value(Holder{D: g}, "keyboard_layout"); ok {
					return v, true
				}
			}
			return Text("us++"), true
		}, Setter: keyboardLayoutSetter, ResetCheck: layoutLoopResetCheck("keyboard_layout"), Side: keyboardLayoutSide})
	define("ATSDR", Spec{Name: "klass", Type: "str", Kind: KindStr, Stage: 2, ReadOnly: true,
		Help: "Class of this qube.",
		Default: func(_ *Model, h Holder) (Value, bool) {
			return Text(h.Class()), true
		}})
	define("ATSD0R", Spec{Name: "label", Type: "label", Kind: KindStr, Stage: 2,
		Help:   "Colour label of this qube's windows and icons.",
		Setter: labelSetter, Side: resetIcon})
	define("ATSD", Spec{Name: "mac", Type: "str", Kind: KindStr, Stage: 2,
		Help:    "MAC address of this qube's network interface.",
		Default: static(Text(defaultMAC)),
		Setter: func(_ *Model, _ Holder, v Value) (Value, error) {
			v.Text = strings.ToLower(v.Text)
			if !isMAC(v.Text) {
				return v, qerr.Abort("invalid MAC address value")
			}
			return v, nil
		}})
	define("ATSD", Spec{Name: "management_dispvm", Type: "vm", Kind: KindVM, Stage: 4, AllowNone: true,
		Help:    "Disposable template used to manage this qube (for example, by Salt).",
		Default: withTemplate("management_dispvm", fromGlobal("management_dispvm")),
		Setter:  dispvmSetter("management_dispvm"), Side: templateChildReset("management_dispvm")})
	define("ATSD", Spec{Name: "maxmem", Type: "int", Kind: KindInt, Stage: 2,
		Help:    "Most memory (MiB) the memory balancer may give this qube; 0 turns balancing off.",
		Default: defaultMaxmem,
		Setter: func(m *Model, h Holder, v Value) (Value, error) {
			if IntSign(v.Text) < 0 {
				return v, propErr("maxmem must be positive or zero")
			}
			return v, nil
		}, Veto: maxmemVeto, Side: templateChildReset("maxmem")})
	define("ATSD", Spec{Name: "memory", Type: "int", Kind: KindInt, Stage: 2,
		Help:    "Memory (MiB) this qube starts with.",
		Default: withTemplate("memory", static(Int(400))),
		Setter:  positive("memory"), Side: templateChildReset("memory")})
	define("ATSDR", Spec{Name: "name", Type: "str", Kind: KindStr, Stage: 2, WriteOnce: true,
		Help: "Name of this qube; fixed at creation."})
	define("ASD", Spec{Name: "netvm", Type: "vm", Kind: KindVM, Stage: 4, AllowNone: true,
		Help:    "Qube that provides network to this qube; none disconnects it.",
		Default: fromGlobal("default_netvm"), Setter: netvmSetter, Veto: netvmVeto,
		ResetPreSide: netvmResetPre, ResetSide: netvmResetSide})
	define("T", Spec{Name: "netvm", Type: "vm", Kind: KindVM, Stage: 4, AllowNone: true,
		Help:    "Qube that provides network to this qube; none disconnects it.",
		Default: static(None), Setter: netvmSetter, Veto: netvmVeto,
		ResetPreSide: netvmResetPre, ResetSide: netvmResetSide})
	define("ATSD", Spec{Name: "provides_network", Type: "bool", Kind: KindBool, Stage: 2,
		Help:    "This qube can provide network to other qubes.",
		Default: static(Bool(false)), Setter: providesNetworkSetter,
		Side: providesNetworkSide, ResetSide: providesNetworkResetSide})
	define("ATSDR", Spec{Name: "qid", Type: "int", Kind: KindInt, Stage: 2, WriteOnce: true,
		Help: "Internal number of this qube; fixed at creation."})
	define("ATSD", Spec{Name: "qrexec_timeout", Type: "int", Kind: KindInt, Stage: 2,
		Help:    "Seconds to wait for the qrexec agent when the qube starts.",
		Default: withTemplate("qrexec_timeout", fromGlobal("default_qrexec_timeout")),
		Setter:  positive("qrexec_timeout"), Side: templateChildReset("qrexec_timeout")})
	define("ATSD", Spec{Name: "shutdown_timeout", Type: "int", Kind: KindInt, Stage: 2,
		Help:    "Seconds a clean shutdown may take before the qube is reported as stuck.",
		Default: withTemplate("shutdown_timeout", fromGlobal("default_shutdown_timeout")),
		Setter:  positive("shutdown_timeout"), Side: templateChildReset("shutdown_timeout")})
	define("ATSD", Spec{Name: "start_time", Type: "str", Kind: KindStr, Stage: 2, ReadOnly: true,
		Help: "When the running qube was started, in seconds since the epoch.",
		Default: func(m *Model, h Holder) (Value, bool) {
			if st := m.Runtime(h.D.Name()).StartTime; st != "" {
				return Text(st), true
			}
			return None, true
		}})
	define("ATSD", Spec{Name: "stubdom_mem", Type: "int", Kind: KindInt, Stage: 2,
		Help:    "Memory (MiB) of the stub domain of an HVM qube; unset for the built-in size.",
		Default: static(None), Setter: positive("stubdom_mem")})
	define("ATSD", Spec{Name: "stubdom_uuid", Type: "str", Kind: KindStr, Stage: 2, ReadOnly: true,
		Help: "UUID of the running stub domain, if any.",
		Default: func(m *Model, h Holder) (Value, bool) {
			return Text(m.Runtime(h.D.Name()).StubdomUUID), true
		}})
	define("ATSD", Spec{Name: "stubdom_xid", Type: "int", Kind: KindInt, Stage: 2, ReadOnly: true,
		Help:    "Hypervisor id of the running stub domain, or -1.",
		Default: runtimeInt(func(r Runtime) int { return r.StubdomXID })})
	define("A", Spec{Name: "template", Type: "vm", Kind: KindVM, Stage: 4, Target: "TemplateVM",
		Help: "Template this qube's root file system comes from.",
		Veto: templateVeto, ResetVeto: func(m *Model, h Holder) error {
			if v, ok := m.Value(Global, "default_template"); ok && !v.None {
				return qerr.ValueError("Cannot unset template. You can set it to the current default (" + v.Text + ") instead")
			}
			return qerr.ValueError("Cannot unset template")
		}})
	define("D", Spec{Name: "template", Type: "vm", Kind: KindVM, Stage: 4,
		Help: "Disposable template this disposable is based on.",
		Setter: func(m *Model, _ Holder, v Value) (Value, error) {
			if !m.templateForDispVMs(m.Domain(v.Text)) {
				return v, propErr("template for disposable must have template_for_dispvms=True")
			}
			return v, nil
		}, Veto: templateVeto, ResetVeto: func(*Model, Holder) error {
			return qerr.ValueError("Cannot unset template")
		}})
	define("AS", Spec{Name: "template_for_dispvms", Type: "bool", Kind: KindBool, Stage: 2,
		Help:    "Disposables may be based on this qube.",
		Default: static(Bool(false)), Veto: templateForDispVMsVeto,
		ResetVeto: func(m *Model, h Holder) error { return templateForDispVMsVeto(m, h, Bool(false)) },
		Side:      resetIcon})
	define("T", Spec{Name: "appvm_default_bootmode", Type: "str", Kind: KindStr, Stage: 4,
		Help: "Boot mode that qubes based on this template use by default.",
		Default: func(m *Model, h Holder) (Value, bool) {
			if v, ok := Feature(h.D, "boot-mode.appvm-default"); ok && v != "" {
				return Text(v), true
			}
			return Text("default"), true
		}, Side: appvmBootmodeSide, ResetSide: appvmBootmodeResetSide})
	define("ATSD", Spec{Name: "updateable", Type: "bool", Kind: KindBool, Stage: 2, ReadOnly: true,
		Help: "This qube keeps changes to its root file system (it has no template).",
		Default: func(_ *Model, h Holder) (Value, bool) {
			return Bool(!HasProperty(h.D.Class, "template")), true
		}})
	define("ATSDR", Spec{Name: "uuid", Type: "str", Kind: KindUUID, Stage: 2, WriteOnce: true,
		Help: "UUID of this qube; fixed at creation."})
	define("ATSD", Spec{Name: "vcpus", Type: "int", Kind: KindInt, Stage: 2,
		Help:    "Number of virtual CPUs.",
		Default: withTemplate("vcpus", static(Int(2))),
		Setter:  positive("vcpus"), Side: templateChildReset("vcpus")})
	define("ATSD", Spec{Name: "virt_mode", Type: "str", Kind: KindStr, Stage: 2,
		Help: "Virtualisation mode: hvm, pv or pvh.",
		Default: func(m *Model, h Holder) (Value, bool) {
			if HasPCIDevices(h.D) {
				return Text("hvm"), true
			}
			return withTemplate("virt_mode", static(Text("pvh")))(m, h)
		}, Setter: func(_ *Model, h Holder, v Value) (Value, error) {
			v.Text = strings.ToLower(v.Text)
			switch v.Text {
			case "hvm", "pv", "pvh":
			default:
				return v, propErr("Invalid virtualization mode, supported values: hvm, pv, pvh")
			}
			if v.Text == "pvh" && HasPCIDevices(h.D) {
				return v, propErr("pvh mode can't be set if pci devices are assigned")
			}
			return v, nil
		}})
	define("ATSD", Spec{Name: "visible_gateway", Type: "str", Kind: KindStr, Stage: 2, ReadOnly: true,
		Help: "Gateway address as this qube sees it.",
		Default: func(m *Model, h Holder) (Value, bool) {
			if v, ok := m.CheckFeature(h.D, "net.fake-gateway", true, false, false); ok && v != "" {
				return Text(v), true
			}
			if n := m.NetVM(h.D); n != nil {
				return m.Value(Holder{D: n}, "gateway")
			}
			return None, true
		}})
	define("ATSD", Spec{Name: "visible_gateway6", Type: "str", Kind: KindStr, Stage: 2, ReadOnly: true,
		Help: "IPv6 gateway address as this qube sees it.",
		Default: func(m *Model, h Holder) (Value, bool) {
			if n := m.NetVM(h.D); n != nil && m.ipv6Enabled(h.D) {
				return m.Value(Holder{D: n}, "gateway6")
			}
			return None, true
		}})
	define("ATSD", Spec{Name: "visible_ip", Type: "str", Kind: KindStr, Stage: 2, ReadOnly: true,
		Help: "IPv4 address as this qube sees it.",
		Default: func(m *Model, h Holder) (Value, bool) {
			if v, ok := m.CheckFeature(h.D, "net.fake-ip", true, false, false); ok && v != "" {
				return Text(v), true
			}
			return m.Value(h, "ip")
		}})
	define("ATSD", Spec{Name: "visible_ip6", Type: "str", Kind: KindStr, Stage: 2, ReadOnly: true,
		Help: "IPv6 address as this qube sees it.",
		Default: func(m *Model, h Holder) (Value, bool) {
			return m.Value(h, "ip6")
		}})
	define("ATSD", Spec{Name: "visible_netmask", Type: "str", Kind: KindStr, Stage: 2, ReadOnly: true,
		Help: "Netmask as this qube sees it.",
		Default: func(m *Model, h Holder) (Value, bool) {
			if v, ok := m.CheckFeature(h.D, "net.fake-netmask", true, false, false); ok && v != "" {
				return Text(v), true
			}
			if n := m.NetVM(h.D); n != nil && m.IsNetworked(n) {
				return Text("255.255.255.255"), true
			}
			return None, true
		}})
	define("ATSD", Spec{Name: "xid", Type: "int", Kind: KindInt, Stage: 2, ReadOnly: true,
		Help:    "Hypervisor id of the running qube, or -1.",
		Default: runtimeInt(func(r Runtime) int { return r.XID })})
}

func defineAdminVMProperties() {
	define("0", Spec{Name: "icon", Type: "str", Kind: KindStr, Stage: 2, ReadOnly: true,
		Help: "Name of the icon shown for dom0.", Default: static(Text("adminvm-black"))})
	define("0", Spec{Name: "include_in_backups", Type: "bool", Kind: KindBool, Stage: 2,
		Help: "Include dom0's home directory in backups by default.", Default: static(Bool(true))})
	define("0", Spec{Name: "keyboard_layout", Type: "str", Kind: KindStr, Stage: 2,
		Help: "Keyboard layout of dom0 as layout+variant+options.", Default: static(Text("us++")),
		Setter: keyboardLayoutSetter, Side: keyboardLayoutSide})
	define("0", Spec{Name: "klass", Type: "str", Kind: KindStr, Stage: 2, ReadOnly: true,
		Help: "Class of this qube.", Default: static(Text("AdminVM"))})
	define("0", Spec{Name: "maxmem", Type: "int", Kind: KindInt, Stage: 2, ReadOnly: true,
		Help: "Most memory (MiB) dom0 may use.",
		Default: func(m *Model, _ Holder) (Value, bool) {
			return Int(m.Host.Dom0MaxMemMiB), true
		}})
	define("0", Spec{Name: "name", Type: "str", Kind: KindStr, Stage: 2, ReadOnly: true,
		Help: "Name of the admin qube.", Default: static(Text("dom0"))})
	define("0", Spec{Name: "qid", Type: "int", Kind: KindInt, Stage: 2, ReadOnly: true,
		Help: "Internal number of the admin qube.", Default: static(Int(0))})
	define("0", Spec{Name: "updateable", Type: "bool", Kind: KindBool, Stage: 2, ReadOnly: true,
		Help: "dom0 is updated on its own.", Default: static(Bool(true))})
	// dom0's uuid has no type in qubesd: a Set is sanitised as text, then refused.
	define("0", Spec{Name: "uuid", Type: "str", Kind: KindStr, Stage: 2, ReadOnly: true,
		Help: "UUID of the admin qube.", Default: static(Text(AdminVMUUID))})
}

func defineRemoteVMProperties() {
	define("R", Spec{Name: "include_in_backups", Type: "bool", Kind: KindBool, Stage: 2,
		Help: "Include this qube in backups by default.", Default: static(Bool(false))})
	define("R", Spec{Name: "remote_name", Type: "str", Kind: KindStr, Stage: 2,
		Help: "Name of this qube on the remote host.", Default: static(None)})
	define("R", Spec{Name: "transport_rpc", Type: "str", Kind: KindStr, Stage: 2,
		Help: "qrexec service that carries calls to the remote host.", Default: static(None)})
	define("R", Spec{Name: "relayvm", Type: "vm", Kind: KindVM, Stage: 4, AllowNone: true,
		Help: "Local qube that relays calls to the remote host.", Default: static(None)})
}

func defineGlobalProperties() {
	g := func(s Spec) {
		s.Stage = 3
		define("G", s)
	}
	g(Spec{Name: "check_updates_vm", Type: "bool", Kind: KindBool,
		Help: "New qubes check for updates unless told otherwise.", Default: static(Bool(true))})
	g(Spec{Name: "clockvm", Type: "vm", Kind: KindVM, AllowNone: true,
		Help: "Qube that keeps the system clock in sync.", Default: static(None), Side: clockvmSide})
	g(Spec{Name: "default_audiovm", Type: "vm", Kind: KindVM, AllowNone: true,
		Help: "Default audio qube of new and default-following qubes.", Default: static(Text("dom0")),
		Side: globalRefire("audiovm")})
	g(Spec{Name: "default_dispvm", Type: "vm", Kind: KindVM, AllowNone: true,
		Help: "Default disposable template.", Default: static(None),
		Setter: dispvmSetter("default_dispvm"), Side: globalDispVMSide, ResetSide: globalDispVMResetSide})
	g(Spec{Name: "default_guivm", Type: "vm", Kind: KindVM, AllowNone: true,
		Help: "Default GUI qube of new and default-following qubes.", Default: static(Text("dom0")),
		Setter: layoutLoopSetter("default_guivm"), ResetCheck: layoutLoopResetCheck("default_guivm"),
		Side: globalRefire("guivm")})
	g(Spec{Name: "default_kernel", Type: "str", Kind: KindStr,
		Help: "Kernel that qubes boot unless they name another.", Veto: kernelVeto,
		ResetCheck: func(*Model, Holder) error {
			// It has no default: qubesd resets it, then cannot read the kernel of
			// the qubes that follow it, nor save qubes.xml, from then on.
			return qerr.ValueError("default_kernel has no default value and cannot be reset; set it to an installed kernel instead")
		}})
	g(Spec{Name: "default_netvm", Type: "vm", Kind: KindVM, AllowNone: true,
		Help: "Qube that provides network to qubes that follow the default.", Default: static(None),
		Setter: defaultNetvmSetter, PreSide: defaultNetvmPreSide, Side: defaultNetvmSide})
	g(Spec{Name: "default_pool", Type: "str", Kind: KindStr,
		Help: "Storage pool for new volumes.",
		Default: func(m *Model, _ Holder) (Value, bool) {
			return m.defaultPool()
		}, Setter: poolSetter})
	for _, vol := range []string{"kernel", "private", "root", "volatile"} {
		g(Spec{Name: "default_pool_" + vol, Type: "str", Kind: KindStr,
			Help:    "Storage pool for new " + vol + " volumes.",
			Default: fromGlobal("default_pool"), Setter: poolSetter})
	}
	g(Spec{Name: "default_qrexec_timeout", Type: "int", Kind: KindInt,
		Help: "Default qrexec_timeout of qubes.", Default: static(Int(60))})
	g(Spec{Name: "default_shutdown_timeout", Type: "int", Kind: KindInt,
		Help: "Default shutdown_timeout of qubes.", Default: static(Int(60))})
	g(Spec{Name: "default_template", Type: "vm", Kind: KindVM, AllowNone: true, Target: "TemplateVM",
		Help: "Template of new qubes unless another is given."})
	g(Spec{Name: "management_dispvm", Type: "vm", Kind: KindVM, AllowNone: true,
		Help: "Default disposable template for managing qubes.", Default: static(None),
		Setter: dispvmSetter("management_dispvm")})
	g(Spec{Name: "maxmem", Type: "int", Kind: KindInt, ReadOnly: true,
		Help: "Memory of the host, in MiB.",
		Default: func(m *Model, _ Holder) (Value, bool) {
			return Int(m.Host.MemoryMiB), true
		}})
	g(Spec{Name: "no_cpus", Type: "int", Kind: KindInt, ReadOnly: true,
		Help: "Number of CPUs of the host.",
		Default: func(m *Model, _ Holder) (Value, bool) {
			return Int(m.Host.CPUs), true
		}})
	g(Spec{Name: "stats_interval", Type: "int", Kind: KindInt,
		Help: "Seconds between two reports of admin.vm.Stats.", Default: static(Int(3))})
	g(Spec{Name: "updatevm", Type: "vm", Kind: KindVM, AllowNone: true,
		Help: "Qube through which dom0 downloads updates.", Default: static(None)})
}
