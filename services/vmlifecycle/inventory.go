package vmlifecycle

import (
	"slices"
	"time"

	"github.com/qubesbus/qubesbus/schemas/config"
	"github.com/qubesbus/qubesbus/schemas/device"
	"github.com/qubesbus/qubesbus/schemas/model"
	"github.com/qubesbus/qubesbus/schemas/replica"
)

// Qube is what the lifecycle needs to know of a qube's configuration: effective values,
// defaults applied.
type Qube struct {
	Name     string
	Class    string // AppVM, TemplateVM, StandaloneVM, AdminVM, DispVM, RemoteVM
	UUID     string
	DomainID string // the config id ("domain-<qid>"), for mutations

	NetVM           string // "" for none
	GuiVM           string
	AudioVM         string
	Memory          int // MiB
	MaxMem          int // MiB
	VCPUs           int
	VirtMode        string
	ShutdownTimeout int    // seconds
	QrexecTimeout   int    // seconds
	Qrexec          bool   // feature qrexec, own or through the template
	ProhibitStart   string // feature prohibit-start ("" = allowed)
	AutoCleanup     bool   // DispVM removed after it stops
	// RequiresDevices: the qube has a device assignment of mode required, which a
	// start must check and attach, or a PCI assignment of any mode, whose device a
	// start must find (through the devices service).
	RequiresDevices bool
}

// IsAdminVM reports whether the qube is dom0.
func (q Qube) IsAdminVM() bool { return q.Class == "AdminVM" }

// IsRemote reports whether the qube is a RemoteVM (no local domain).
func (q Qube) IsRemote() bool { return q.Class == "RemoteVM" }

// Inventory is the configuration as the lifecycle reads it (ReplicaInventory, or a
// fake in tests).
type Inventory interface {
	// Qube returns one qube by name.
	Qube(name string) (Qube, bool)
	// Qubes returns every qube in configuration order (qubesd's iteration order).
	Qubes() []Qube
	// Remotes names the RemoteVMs (always Running).
	Remotes() []string
	// StatsInterval is the global stats_interval.
	StatsInterval() time.Duration
}

// ReplicaInventory reads qubes from a configuration replica, with the effective
// values (defaults, template chains) of the properties service's model.
type ReplicaInventory struct {
	R    *replica.Replica
	Host model.Host // zero: model.DefaultHost
}

var _ Inventory = ReplicaInventory{}

func (ri ReplicaInventory) view(f func(m *model.Model)) {
	host := ri.Host
	if host.MemoryMiB == 0 {
		host = model.DefaultHost
	}
	// The replica's name index keeps a lookup of one qube constant-time.
	ri.R.ViewIndexed(func(c *config.Config, byName func(string) *config.Domain) {
		f(model.NewIndexed(c, host, nil, byName))
	})
}

// Qube implements Inventory.
func (ri ReplicaInventory) Qube(name string) (Qube, bool) {
	var q Qube
	var ok bool
	ri.view(func(m *model.Model) {
		if d := m.Domain(name); d != nil {
			q, ok = qubeOf(m, d), true
		}
	})
	return q, ok
}

// Qubes implements Inventory.
func (ri ReplicaInventory) Qubes() []Qube {
	var out []Qube
	ri.view(func(m *model.Model) {
		out = make([]Qube, 0, len(m.C.Domains))
		for i := range m.C.Domains {
			out = append(out, qubeOf(m, &m.C.Domains[i]))
		}
	})
	return out
}

// Remotes implements Inventory: a class scan, no effective values computed.
func (ri ReplicaInventory) Remotes() []string {
	var out []string
	ri.R.View(func(c *config.Config) {
		for i := range c.Domains {
			if c.Domains[i].Class == "RemoteVM" {
				out = append(out, c.Domains[i].Name())
			}
		}
	})
	return out
}

// StatsInterval implements Inventory.
func (ri ReplicaInventory) StatsInterval() time.Duration {
	sec := 3
	ri.view(func(m *model.Model) {
		if n, ok := m.Int(model.Global, "stats_interval"); ok {
			sec = n
		}
	})
	return time.Duration(sec) * time.Second
}

func qubeOf(m *model.Model, d *config.Domain) Qube {
	h := model.Holder{D: d}
	q := Qube{Name: d.Name(), Class: d.Class, DomainID: d.ID}
	if d.Class == "AdminVM" {
		q.UUID = replica.AdminVMUUID
		return q
	}
	q.UUID, _ = d.Property("uuid")
	name := func(r *config.Domain) string {
		if r == nil {
			return ""
		}
		return r.Name()
	}
	q.NetVM = name(m.NetVM(d))
	q.GuiVM = name(m.Ref(h, "guivm"))
	q.AudioVM = name(m.Ref(h, "audiovm"))
	q.Memory, _ = m.Int(h, "memory")
	q.MaxMem, _ = m.Int(h, "maxmem")
	q.VCPUs, _ = m.Int(h, "vcpus")
	if v, ok := m.Value(h, "virt_mode"); ok {
		q.VirtMode = v.Text
	}
	q.ShutdownTimeout, _ = m.Int(h, "shutdown_timeout")
	q.QrexecTimeout, _ = m.Int(h, "qrexec_timeout")
	if v, ok := m.CheckFeature(d, "qrexec", true, false, false); ok && v != "" {
		q.Qrexec = true
	}
	q.ProhibitStart, _ = model.Feature(d, "prohibit-start")
	q.AutoCleanup = d.Class == "DispVM" && m.Bool(h, "auto_cleanup")
	for _, el := range d.Devices {
		_, as, err := device.UnmarshalDevices(el, d.Name())
		// An element the devices service cannot read either is its to report.
		if err != nil || slices.ContainsFunc(as, func(a device.Assignment) bool {
			return a.Mode == device.ModeRequired || a.Class == "pci"
		}) {
			q.RequiresDevices = true
		}
	}
	return q
}
