package vmlifecycle

import (
	"context"
	"errors"
	"time"
)

// Driver is the hypervisor as the lifecycle service needs it: libvirt/Xen in a real
// dom0, simdriver in tests and `qubesbus run`. The driver owns runtime state (which
// domains exist, their ids and sub-states); the service never stores it elsewhere, so a
// restarted service reads it back with Domains.
//
// Calls address domains by qube name. They return ErrNoDomain when no domain of that
// name is active. Stops are always reported through Watch, whatever caused them (a
// graceful shutdown completing, a crash, Destroy, the guest powering itself off);
// pauses and resumes are reported only when the service did not ask for them.
type Driver interface {
	// Domains returns every active domain, dom0 included (xid 0).
	Domains(ctx context.Context) ([]Domain, error)
	// Domain returns the active domain of a qube; ok is false when there is none.
	Domain(ctx context.Context, name string) (d Domain, ok bool, err error)

	// ReserveMemory sets memory aside for a domain about to be created (qmemman's
	// request); ErrNotEnoughMemory when the host cannot give it. Create consumes the
	// reservation; ReleaseMemory returns one that was not used.
	ReserveMemory(ctx context.Context, name string, mib int) error
	ReleaseMemory(ctx context.Context, name string) error
	// Create creates the domain paused and returns it with its new xid.
	Create(ctx context.Context, spec DomainSpec) (Domain, error)
	// Unpause resumes a paused domain (also the last step of a start).
	Unpause(ctx context.Context, name string) error
	// Pause freezes a domain; pausing a paused domain does nothing.
	Pause(ctx context.Context, name string) error
	// Shutdown asks the guest to power off and returns at once; the stop is reported
	// through Watch when it happens (or never, if the guest ignores the request).
	Shutdown(ctx context.Context, name string) error
	// Destroy stops a domain at once. The stop is also reported through Watch.
	Destroy(ctx context.Context, name string) error
	// Suspend puts the guest into ACPI S3; ErrUnsupported when the guest cannot.
	Suspend(ctx context.Context, name string) error
	// Wakeup resumes a suspended guest.
	Wakeup(ctx context.Context, name string) error
	// Console returns the path of the terminal of an active domain's console (a
	// pseudo-terminal, /dev/pts/N), as libvirt reports it.
	Console(ctx context.Context, name string) (string, error)
	// WaitAgent returns once the qrexec agent of the domain instance xid is connected,
	// ErrNoDomain if that instance stops first, or ctx's error.
	WaitAgent(ctx context.Context, name string, xid int) error

	// Watch reports hypervisor notices until ctx ends; the channel is then closed.
	// Notices of one domain arrive in the order they happened.
	Watch(ctx context.Context) (<-chan Notice, error)
}

// HVState is the hypervisor's sub-state of an active domain.
type HVState string

const (
	HVRunning     HVState = "running"
	HVPaused      HVState = "paused"
	HVShutdown    HVState = "shutdown"    // shutting down (power state Halting)
	HVShutoff     HVState = "shutoff"     // stopped but still reported active (Dying)
	HVCrashed     HVState = "crashed"     // crashed, not yet cleaned up (Crashed)
	HVPMSuspended HVState = "pmsuspended" // ACPI S3 (Suspended)
)

// Domain is an active hypervisor domain.
type Domain struct {
	Name           string        `json:"name"`
	XID            int           `json:"xid"`
	StubdomXID     int           `json:"stubdom_xid"` // -1 without a stub domain
	State          HVState       `json:"state"`
	StartTime      time.Time     `json:"start_time"`
	MemoryKiB      int64         `json:"memory_kib"`
	MaxMemKiB      int64         `json:"maxmem_kib"`
	CPUTime        time.Duration `json:"cpu_time"`
	VCPUs          int           `json:"vcpus"`
	AgentConnected bool          `json:"agent_connected"`
}

// DomainSpec is what Create needs to know of a qube.
type DomainSpec struct {
	Name      string
	UUID      string
	MemoryMiB int
	MaxMemMiB int
	VCPUs     int
	VirtMode  string // pvh, pv or hvm (hvm runs a stub domain)
	// Qrexec says the guest runs a qrexec agent (WaitAgent is meaningful).
	Qrexec bool
}

// NoticeKind is what a Notice reports.
type NoticeKind string

const (
	NoticeStopped  NoticeKind = "stopped"
	NoticePaused   NoticeKind = "paused"
	NoticeUnpaused NoticeKind = "unpaused"
)

// Notice is something the hypervisor reports on its own.
type Notice struct {
	Kind    NoticeKind `json:"kind"`
	Name    string     `json:"name"`
	XID     int        `json:"xid"`               // the domain instance it is about
	Crashed bool       `json:"crashed,omitempty"` // a stop caused by a crash
	// Backlog says the notice was reported before the current Watch began (a driver
	// that keeps notices while nobody watches, hvbus): the instance that watched then
	// may have died before announcing it.
	Backlog bool `json:"-"`
}

// Driver errors; implementations wrap them.
var (
	ErrNoDomain        = errors.New("no such active domain")
	ErrNotEnoughMemory = errors.New("not enough memory")
	ErrUnsupported     = errors.New("operation not supported by the guest")
)
