// Package simdriver is a simulated hypervisor for the lifecycle service: domains with
// ids and sub-states, a host memory pool, configurable boot and shutdown latency, and
// fault injection (a start that fails, a crash at a given time, a shutdown that hangs,
// a guest that cannot suspend, a qrexec agent that never connects) driven by a test lab
// over NATS (lab.go).
//
// A Hypervisor lives outside any lifecycle service: a restarted service is handed the
// same Hypervisor and reads its domains back, as a real one would from Xen.
//
// Unlike a real host, the simulation is deterministic about time: every asynchronous
// completion (a graceful shutdown finishing, a crash at a given time, a qrexec agent
// connecting) is an entry of one deadline-ordered queue (sched.go), carried out in the
// order of its due time, ties in the order the operations were requested, so that equal
// latencies always complete in request order.
package simdriver

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/qubesbus/qubesbus/schemas/device"
	"github.com/qubesbus/qubesbus/services/vmlifecycle"
)

// Config of the simulated host. The defaults match the recorded transcripts: boot is
// instant and a graceful shutdown takes about 0.3 s.
type Config struct {
	// BootLatency is the time from the first unpause of a domain until its qrexec
	// agent connects (the qube is Transient meanwhile). Default 0: at once.
	BootLatency time.Duration `json:"boot_latency"`
	// ShutdownLatency is how long a graceful shutdown takes. Default 300 ms; negative
	// means at once.
	ShutdownLatency time.Duration `json:"shutdown_latency"`
	// MemoryMiB is the memory qubes may use (dom0's excluded). Default 16384.
	MemoryMiB int `json:"memory_mib"`
	// Dom0MemoryMiB is dom0's memory. Default 4096.
	Dom0MemoryMiB int `json:"dom0_memory_mib"`
	// Load is the CPU share of one vcpu a running guest uses (cputime growth).
	// Default 0.02.
	Load float64 `json:"load"`
	// PCIDevices are the host's PCI devices (exposed by dom0); nil: the reference
	// host's (DefaultPCIDevices). BlockDevices are the block devices backend qubes
	// expose while they run; nil: DefaultBlockDevices. Read by New only.
	PCIDevices   []device.Info `json:"-"`
	BlockDevices []device.Info `json:"-"`
}

func (c Config) withDefaults() Config {
	if c.ShutdownLatency == 0 {
		c.ShutdownLatency = 300 * time.Millisecond
	}
	if c.ShutdownLatency < 0 {
		c.ShutdownLatency = 0
	}
	if c.BootLatency < 0 {
		c.BootLatency = 0
	}
	if c.MemoryMiB == 0 {
		c.MemoryMiB = 16384
	}
	if c.Dom0MemoryMiB == 0 {
		c.Dom0MemoryMiB = 4096
	}
	if c.Load == 0 {
		c.Load = 0.02
	}
	return c
}

// Faults are what the lab injects into one qube. They stay until replaced.
type Faults struct {
	// StartFails makes Create fail with this hypervisor text.
	StartFails string `json:"start_fails,omitempty"`
	// CrashAfter crashes the domain this long after each start, and this long after the
	// faults are set if it is running then. Zero: no crash.
	CrashAfter time.Duration `json:"crash_after,omitempty"`
	// ShutdownHangs makes the guest ignore graceful shutdown requests (it stays
	// Halting until destroyed).
	ShutdownHangs bool `json:"shutdown_hangs,omitempty"`
	// SuspendUnsupported makes ACPI suspend fail (the lifecycle pauses instead).
	SuspendUnsupported bool `json:"suspend_unsupported,omitempty"`
	// AgentNeverConnects keeps the qrexec agent from connecting.
	AgentNeverConnects bool `json:"agent_never_connects,omitempty"`
	// PreserveCrash keeps a crashed domain in the Crashed state until it is destroyed
	// (Xen's on_crash=preserve); by default it is cleaned up at once.
	PreserveCrash bool `json:"preserve_crash,omitempty"`
}

// Hypervisor is the simulated host.
type Hypervisor struct {
	mu       sync.Mutex
	sched    scheduler
	cfg      Config
	boot     time.Time
	nextXID  int
	domains  map[string]*domain
	reserved map[string]int
	faults   map[string]Faults
	watchers map[*watcher]struct{}
	devices  hostDevices
}

var _ vmlifecycle.Driver = (*Hypervisor)(nil)

type domain struct {
	name     string
	xid      int
	stubXID  int
	state    vmlifecycle.HVState
	prev     vmlifecycle.HVState // state to return to on unpause
	start    time.Time
	memMiB   int
	maxMiB   int
	vcpus    int
	qrexec   bool
	booted   bool          // unpaused at least once
	cpu      time.Duration // accrued while not running since runSince
	runSince time.Time     // zero unless running
	agent    chan struct{} // closed when the qrexec agent connected
	gone     chan struct{} // closed when the domain stopped
	pending  []*dueEntry   // completions scheduled for this instance
	stopping bool          // a graceful shutdown was requested
	crashed  bool
	console  *console // opened on first use (console.go)
}

// New returns a hypervisor with only dom0 running.
func New(cfg Config) *Hypervisor {
	h := &Hypervisor{cfg: cfg.withDefaults(), boot: time.Now(), nextXID: 1,
		domains: map[string]*domain{}, reserved: map[string]int{}, faults: map[string]Faults{},
		watchers: map[*watcher]struct{}{}, sched: newScheduler()}
	pci, block := cfg.PCIDevices, cfg.BlockDevices
	if pci == nil {
		pci = DefaultPCIDevices()
	}
	if block == nil {
		block = DefaultBlockDevices()
	}
	h.devices.all = append(slices.Clone(pci), block...)
	return h
}

// Errors of the simulation besides the driver's.
var (
	ErrExists = errors.New("domain already exists")
	ErrState  = errors.New("operation not valid in the domain's state")
)

// Config returns the current configuration.
func (h *Hypervisor) Config() Config {
	h.lock()
	defer h.mu.Unlock()
	return h.cfg
}

// SetConfig replaces the configuration (defaults applied); running domains keep the
// latencies they were started with.
func (h *Hypervisor) SetConfig(c Config) {
	h.lock()
	h.cfg = c.withDefaults()
	h.mu.Unlock()
}

// SetFaults replaces the faults of a qube (the zero Faults clears them).
func (h *Hypervisor) SetFaults(vm string, f Faults) {
	h.lock()
	defer h.mu.Unlock()
	if f == (Faults{}) {
		delete(h.faults, vm)
	} else {
		h.faults[vm] = f
	}
	if d := h.domains[vm]; d != nil && f.CrashAfter > 0 {
		h.armCrash(d, f.CrashAfter)
	}
}

func (h *Hypervisor) snapshot(d *domain, now time.Time) vmlifecycle.Domain {
	cpu := d.cpu
	if !d.runSince.IsZero() {
		cpu += time.Duration(float64(now.Sub(d.runSince)) * h.cfg.Load)
	}
	return vmlifecycle.Domain{
		Name: d.name, XID: d.xid, StubdomXID: d.stubXID, State: d.state, StartTime: d.start,
		MemoryKiB: int64(d.memMiB) * 1024, MaxMemKiB: int64(d.maxMiB) * 1024, CPUTime: cpu,
		VCPUs: d.vcpus, AgentConnected: isClosed(d.agent),
	}
}

func (h *Hypervisor) dom0(now time.Time) vmlifecycle.Domain {
	kib := int64(h.cfg.Dom0MemoryMiB) * 1024
	return vmlifecycle.Domain{Name: "dom0", XID: 0, StubdomXID: -1, State: vmlifecycle.HVRunning,
		StartTime: h.boot, MemoryKiB: kib, MaxMemKiB: kib, VCPUs: 2, AgentConnected: true,
		CPUTime: time.Duration(float64(now.Sub(h.boot)) * h.cfg.Load)}
}

func isClosed(c chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// Domains implements vmlifecycle.Driver.
func (h *Hypervisor) Domains(context.Context) ([]vmlifecycle.Domain, error) {
	h.lock()
	defer h.mu.Unlock()
	now := time.Now()
	out := []vmlifecycle.Domain{h.dom0(now)}
	for _, d := range h.domains {
		out = append(out, h.snapshot(d, now))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].XID < out[j].XID })
	return out, nil
}

// Domain implements vmlifecycle.Driver.
func (h *Hypervisor) Domain(_ context.Context, name string) (vmlifecycle.Domain, bool, error) {
	h.lock()
	defer h.mu.Unlock()
	if name == "dom0" {
		return h.dom0(time.Now()), true, nil
	}
	d := h.domains[name]
	if d == nil {
		return vmlifecycle.Domain{}, false, nil
	}
	return h.snapshot(d, time.Now()), true, nil
}

// FreeMemoryMiB is the memory not used nor reserved.
func (h *Hypervisor) FreeMemoryMiB() int {
	h.lock()
	defer h.mu.Unlock()
	return h.freeLocked()
}

func (h *Hypervisor) freeLocked() int {
	free := h.cfg.MemoryMiB
	for _, d := range h.domains {
		free -= d.memMiB
	}
	for _, r := range h.reserved {
		free -= r
	}
	return free
}

// ReserveMemory implements vmlifecycle.Driver.
func (h *Hypervisor) ReserveMemory(_ context.Context, name string, mib int) error {
	h.lock()
	defer h.mu.Unlock()
	delete(h.reserved, name)
	if free := h.freeLocked(); mib > free {
		return fmt.Errorf("%w: %s needs %d MiB, %d MiB free", vmlifecycle.ErrNotEnoughMemory, name, mib, free)
	}
	h.reserved[name] = mib
	return nil
}

// ReleaseMemory implements vmlifecycle.Driver.
func (h *Hypervisor) ReleaseMemory(_ context.Context, name string) error {
	h.lock()
	delete(h.reserved, name)
	h.mu.Unlock()
	return nil
}

// Create implements vmlifecycle.Driver.
func (h *Hypervisor) Create(_ context.Context, spec vmlifecycle.DomainSpec) (vmlifecycle.Domain, error) {
	h.lock()
	defer h.mu.Unlock()
	if h.domains[spec.Name] != nil || spec.Name == "dom0" {
		return vmlifecycle.Domain{}, fmt.Errorf("%w: %s", ErrExists, spec.Name)
	}
	f := h.faults[spec.Name]
	if f.StartFails != "" {
		return vmlifecycle.Domain{}, errors.New(f.StartFails)
	}
	mem, ok := h.reserved[spec.Name]
	if !ok {
		mem = spec.MemoryMiB
	}
	delete(h.reserved, spec.Name)
	d := &domain{name: spec.Name, xid: h.nextXID, stubXID: -1, state: vmlifecycle.HVPaused,
		prev: vmlifecycle.HVRunning, start: time.Now(), memMiB: mem, maxMiB: spec.MaxMemMiB,
		vcpus: spec.VCPUs, qrexec: spec.Qrexec, agent: make(chan struct{}), gone: make(chan struct{})}
	h.nextXID++
	if spec.VirtMode == "hvm" {
		d.stubXID = h.nextXID
		h.nextXID++
	}
	if d.maxMiB < d.memMiB {
		d.maxMiB = d.memMiB
	}
	if d.vcpus <= 0 {
		d.vcpus = 1
	}
	if !spec.Qrexec {
		close(d.agent)
	}
	h.domains[spec.Name] = d
	if f.CrashAfter > 0 {
		h.armCrash(d, f.CrashAfter)
	}
	return h.snapshot(d, time.Now()), nil
}

func (h *Hypervisor) armCrash(d *domain, after time.Duration) {
	h.afterLocked(d, after, func() { h.crashLocked(d) })
}

func (h *Hypervisor) crashLocked(d *domain) {
	d.setState(vmlifecycle.HVCrashed, h.cfg.Load)
	d.crashed = true
	if !h.faults[d.name].PreserveCrash {
		h.stopLocked(d, true)
	}
}

func (h *Hypervisor) get(name string) (*domain, error) {
	d := h.domains[name]
	if d == nil {
		return nil, fmt.Errorf("%w: %s", vmlifecycle.ErrNoDomain, name)
	}
	return d, nil
}

// setState moves a domain between sub-states, keeping its cpu time accounting.
func (d *domain) setState(s vmlifecycle.HVState, load float64) {
	now := time.Now()
	if !d.runSince.IsZero() {
		d.cpu += time.Duration(float64(now.Sub(d.runSince)) * load)
		d.runSince = time.Time{}
	}
	d.state = s
	if s == vmlifecycle.HVRunning || s == vmlifecycle.HVShutdown {
		d.runSince = now
	}
}

// Unpause implements vmlifecycle.Driver.
func (h *Hypervisor) Unpause(_ context.Context, name string) error {
	h.lock()
	defer h.mu.Unlock()
	d, err := h.get(name)
	if err != nil {
		return err
	}
	h.unpauseLocked(d)
	return nil
}

func (h *Hypervisor) unpauseLocked(d *domain) {
	if d.state != vmlifecycle.HVPaused {
		return
	}
	d.setState(d.prev, h.cfg.Load)
	if d.booted {
		return
	}
	d.booted = true
	if isClosed(d.agent) || h.faults[d.name].AgentNeverConnects {
		return
	}
	if h.cfg.BootLatency == 0 {
		close(d.agent)
		return
	}
	h.afterLocked(d, h.cfg.BootLatency, func() {
		if !isClosed(d.agent) {
			close(d.agent)
		}
	})
}

// Pause implements vmlifecycle.Driver.
func (h *Hypervisor) Pause(_ context.Context, name string) error {
	h.lock()
	defer h.mu.Unlock()
	d, err := h.get(name)
	if err != nil {
		return err
	}
	if d.state == vmlifecycle.HVCrashed {
		return fmt.Errorf("%w: pause a crashed domain", ErrState)
	}
	h.pauseLocked(d)
	return nil
}

func (h *Hypervisor) pauseLocked(d *domain) bool {
	if d.state == vmlifecycle.HVPaused {
		return false
	}
	d.prev = d.state
	d.setState(vmlifecycle.HVPaused, h.cfg.Load)
	return true
}

// Shutdown implements vmlifecycle.Driver.
func (h *Hypervisor) Shutdown(_ context.Context, name string) error {
	h.lock()
	defer h.mu.Unlock()
	d, err := h.get(name)
	if err != nil {
		return err
	}
	if d.state == vmlifecycle.HVPaused || d.state == vmlifecycle.HVCrashed {
		return fmt.Errorf("%w: shutdown of a %s domain", ErrState, d.state)
	}
	d.setState(vmlifecycle.HVShutdown, h.cfg.Load)
	if d.stopping || h.faults[name].ShutdownHangs {
		return nil
	}
	d.stopping = true
	h.afterLocked(d, h.cfg.ShutdownLatency, func() { h.stopLocked(d, false) })
	return nil
}

// Destroy implements vmlifecycle.Driver.
func (h *Hypervisor) Destroy(_ context.Context, name string) error {
	h.lock()
	defer h.mu.Unlock()
	d, err := h.get(name)
	if err != nil {
		return err
	}
	h.stopLocked(d, false)
	return nil
}

// stopLocked removes a domain, frees its memory and reports the stop.
func (h *Hypervisor) stopLocked(d *domain, crashed bool) {
	for _, e := range d.pending {
		h.sched.cancelLocked(e)
	}
	d.pending = nil
	close(d.gone)
	if d.console != nil {
		d.console.close()
	}
	delete(h.domains, d.name)
	h.dropDevicesLocked(d.name)
	h.notifyLocked(vmlifecycle.Notice{Kind: vmlifecycle.NoticeStopped, Name: d.name, XID: d.xid, Crashed: crashed || d.crashed})
}

// Suspend implements vmlifecycle.Driver.
func (h *Hypervisor) Suspend(_ context.Context, name string) error {
	h.lock()
	defer h.mu.Unlock()
	d, err := h.get(name)
	if err != nil {
		return err
	}
	switch {
	case d.state == vmlifecycle.HVPMSuspended:
		return nil
	case d.state == vmlifecycle.HVCrashed:
		return fmt.Errorf("%w: suspend a crashed domain", ErrState)
	case h.faults[name].SuspendUnsupported || d.state != vmlifecycle.HVRunning:
		return fmt.Errorf("%w: suspend %s", vmlifecycle.ErrUnsupported, name)
	}
	d.setState(vmlifecycle.HVPMSuspended, h.cfg.Load)
	return nil
}

// Wakeup implements vmlifecycle.Driver.
func (h *Hypervisor) Wakeup(_ context.Context, name string) error {
	h.lock()
	defer h.mu.Unlock()
	d, err := h.get(name)
	if err != nil {
		return err
	}
	if d.state != vmlifecycle.HVPMSuspended {
		return fmt.Errorf("%w: wake a %s domain", ErrState, d.state)
	}
	d.setState(vmlifecycle.HVRunning, h.cfg.Load)
	return nil
}

// WaitAgent implements vmlifecycle.Driver.
func (h *Hypervisor) WaitAgent(ctx context.Context, name string, xid int) error {
	h.lock()
	d := h.domains[name]
	if d == nil || d.xid != xid {
		h.mu.Unlock()
		return fmt.Errorf("%w: %s", vmlifecycle.ErrNoDomain, name)
	}
	agent, gone := d.agent, d.gone
	h.mu.Unlock()
	select {
	case <-agent:
		return nil
	case <-gone:
		return fmt.Errorf("%w: %s stopped", vmlifecycle.ErrNoDomain, name)
	case <-ctx.Done():
		return ctx.Err()
	}
}

// --- what the lab does to domains behind the service's back ---

// Crash makes a running domain crash now.
func (h *Hypervisor) Crash(vm string) error {
	h.lock()
	defer h.mu.Unlock()
	d, err := h.get(vm)
	if err != nil {
		return err
	}
	h.crashLocked(d)
	return nil
}

// PowerOff makes the guest power itself off now.
func (h *Hypervisor) PowerOff(vm string) error {
	h.lock()
	defer h.mu.Unlock()
	d, err := h.get(vm)
	if err != nil {
		return err
	}
	h.stopLocked(d, false)
	return nil
}

// PauseBehind pauses a domain without the service asking (xl pause).
func (h *Hypervisor) PauseBehind(vm string) error {
	h.lock()
	defer h.mu.Unlock()
	d, err := h.get(vm)
	if err != nil {
		return err
	}
	if h.pauseLocked(d) {
		h.notifyLocked(vmlifecycle.Notice{Kind: vmlifecycle.NoticePaused, Name: vm, XID: d.xid})
	}
	return nil
}

// UnpauseBehind resumes a paused domain without the service asking (xl unpause).
func (h *Hypervisor) UnpauseBehind(vm string) error {
	h.lock()
	defer h.mu.Unlock()
	d, err := h.get(vm)
	if err != nil {
		return err
	}
	if d.state == vmlifecycle.HVPaused {
		h.unpauseLocked(d)
		h.notifyLocked(vmlifecycle.Notice{Kind: vmlifecycle.NoticeUnpaused, Name: vm, XID: d.xid})
	}
	return nil
}

// --- notices ---

type watcher struct {
	mu     sync.Mutex
	queue  []vmlifecycle.Notice
	signal chan struct{}
}

func (h *Hypervisor) notifyLocked(n vmlifecycle.Notice) {
	for w := range h.watchers {
		w.mu.Lock()
		w.queue = append(w.queue, n)
		w.mu.Unlock()
		select {
		case w.signal <- struct{}{}:
		default:
		}
	}
}

// Watch implements vmlifecycle.Driver. Notices queue without bound, so a slow watcher
// never stalls the hypervisor.
func (h *Hypervisor) Watch(ctx context.Context) (<-chan vmlifecycle.Notice, error) {
	w := &watcher{signal: make(chan struct{}, 1)}
	h.mu.Lock()
	h.watchers[w] = struct{}{}
	h.mu.Unlock()
	out := make(chan vmlifecycle.Notice)
	go func() {
		defer close(out)
		defer func() {
			h.mu.Lock()
			delete(h.watchers, w)
			h.mu.Unlock()
		}()
		for {
			select {
			case <-ctx.Done():
				return
			case <-w.signal:
			}
			for {
				w.mu.Lock()
				if len(w.queue) == 0 {
					w.mu.Unlock()
					break
				}
				n := w.queue[0]
				w.queue = w.queue[1:]
				w.mu.Unlock()
				select {
				case out <- n:
				case <-ctx.Done():
					return
				}
			}
		}
	}()
	return out, nil
}
