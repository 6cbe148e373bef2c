// Package hvbus serves a hypervisor driver (vmlifecycle.Driver) over NATS and drives
// one from the other side.
//
// The hypervisor runs as its own process so that the lifecycle service can fail over:
// a standby instance takes over the same hypervisor, reads its domains back with
// Domains, and carries on. Calls are request-reply on qubes.v1.<host>.hv.<op> (Serve,
// Client). Notices (a domain stopped, paused, unpaused) go through the JetStream
// stream QUBES_HV, consumed by a durable consumer per host, so that those reported
// while no instance was watching (during a takeover) reach the next Watch, in order.
//
// Wire format: JSON bodies (callArgs in, the method's results out). The caller's
// remaining time travels in the Qubes-Timeout-Ms header, so the server's call ends when
// the caller gives up; a caller that gives up early also publishes the call id on
// qubes.v1.<host>.hv.cancel. Failures are micro errors whose code (Code*) says which
// vmlifecycle sentinel, if any, the error matches.
package hvbus

import (
	"context"
	"errors"
	"strings"
	"time"

	"github.com/qubesbus/qubesbus/bus/qerr"
	"github.com/qubesbus/qubesbus/schemas/hostdev"
	"github.com/qubesbus/qubesbus/services/vmlifecycle"
)

// Operations: the last token of each subject (subject.Host.Hypervisor).
const (
	OpDomains       = "domains"
	OpDomain        = "domain"
	OpReserveMemory = "reserve-memory"
	OpReleaseMemory = "release-memory"
	OpCreate        = "create"
	OpUnpause       = "unpause"
	OpPause         = "pause"
	OpShutdown      = "shutdown"
	OpDestroy       = "destroy"
	OpSuspend       = "suspend"
	OpWakeup        = "wakeup"
	OpWaitAgent     = "wait-agent"
	OpConsole       = "console"
	// OpCancel is not a call: its body is the id of a call whose caller has gone.
	OpCancel = "cancel"
	// Devices of the host (DeviceDriver), asked by the devices service through
	// hostdev.Client.
	OpDevices      = hostdev.OpDevices
	OpAttachDevice = hostdev.OpAttach
	OpDetachDevice = hostdev.OpDetach
)

// DeviceDriver knows the host's devices (the simulated hypervisor does); the server
// answers the device operations of Config.Devices.
type DeviceDriver interface {
	Devices(ctx context.Context) (hostdev.Inventory, error)
	AttachDevice(ctx context.Context, a hostdev.Attachment) error
	DetachDevice(ctx context.Context, a hostdev.Attachment) error
}

// DeviceChangeNotifier reports hot-plugs and unplugs (the simulated hypervisor does);
// the server announces each of Config.DeviceChanges on subject.Host.HypervisorDevices,
// the body a hostdev.Change.
type DeviceChangeNotifier interface {
	OnDeviceChange(f func(backend string))
}

// NoticeStream is the JetStream stream holding every host's hypervisor notices.
const NoticeStream = "QUBES_HV"

// DefaultTimeout bounds a call whose context has no deadline (WaitAgent excepted: it
// waits as long as its context allows).
const DefaultTimeout = 30 * time.Second

// Request headers.
const (
	headerCallID  = "Qubes-Call-Id"
	headerTimeout = "Qubes-Timeout-Ms"
	headerEpoch   = "Qubes-Epoch"
)

// ErrFenced refuses a change from a lifecycle instance whose lease term is older than
// one the hypervisor has already heard from: a deposed leader that has not noticed yet
// must not drive domains beside its successor.
var ErrFenced = errors.New("fenced: a later lifecycle term drives this hypervisor")

// reads are the operations that change nothing, which a deposed leader may still make.
var reads = map[string]bool{OpDomains: true, OpDomain: true, OpWaitAgent: true, OpDevices: true}

// Error codes of failed calls. They are stable: other tools may read them.
const (
	CodeNoDomain        = "no-domain"         // vmlifecycle.ErrNoDomain
	CodeNotEnoughMemory = "not-enough-memory" // vmlifecycle.ErrNotEnoughMemory
	CodeUnsupported     = "unsupported"       // vmlifecycle.ErrUnsupported
	CodeTimeout         = "timeout"           // the caller's time ran out (context.DeadlineExceeded)
	CodeCanceled        = "canceled"          // the caller cancelled the call (context.Canceled)
	CodeUnavailable     = "unavailable"       // the server is stopping
	CodeBadRequest      = "bad-request"       // malformed request
	CodeFenced          = "fenced"            // ErrFenced
	CodeFailed          = "failed"            // any other driver error; the text says what
)

// sentinels maps codes to the errors a client's Error matches; the server picks the
// first whose error the driver's error matches.
var sentinels = qerr.Codes{
	{Code: CodeNoDomain, Err: vmlifecycle.ErrNoDomain},
	{Code: CodeNotEnoughMemory, Err: vmlifecycle.ErrNotEnoughMemory},
	{Code: CodeUnsupported, Err: vmlifecycle.ErrUnsupported},
	{Code: CodeTimeout, Err: context.DeadlineExceeded},
	{Code: CodeCanceled, Err: context.Canceled},
	{Code: CodeFenced, Err: ErrFenced},
}

// Error is a failure the hypervisor reported. errors.Is matches it against the
// sentinel of its code (vmlifecycle.ErrNoDomain for CodeNoDomain, …).
type Error struct {
	Code    string
	Message string
}

func (e *Error) Error() string { return e.Message }

// Unwrap returns the sentinel of the code, nil for codes without one.
func (e *Error) Unwrap() error { return sentinels.Err(e.Code) }

// callArgs is the request body of every call; each uses the fields it needs.
type callArgs struct {
	Name string    `json:"name,omitempty"`
	MiB  int       `json:"mib,omitempty"`
	XID  int       `json:"xid"`
	Spec *specWire `json:"spec,omitempty"`
	// Attach is the body of OpAttachDevice and OpDetachDevice (hostdev.Args).
	Attach *hostdev.Attachment `json:"attach,omitempty"`
}

// specWire is vmlifecycle.DomainSpec with stable JSON names (DomainSpec has no tags).
type specWire struct {
	Name      string `json:"name"`
	UUID      string `json:"uuid,omitempty"`
	MemoryMiB int    `json:"memory_mib"`
	MaxMemMiB int    `json:"maxmem_mib"`
	VCPUs     int    `json:"vcpus"`
	VirtMode  string `json:"virt_mode,omitempty"`
	Qrexec    bool   `json:"qrexec,omitempty"`
}

func toWire(s vmlifecycle.DomainSpec) *specWire {
	return &specWire{Name: s.Name, UUID: s.UUID, MemoryMiB: s.MemoryMiB, MaxMemMiB: s.MaxMemMiB,
		VCPUs: s.VCPUs, VirtMode: s.VirtMode, Qrexec: s.Qrexec}
}

func (s *specWire) spec() vmlifecycle.DomainSpec {
	return vmlifecycle.DomainSpec{Name: s.Name, UUID: s.UUID, MemoryMiB: s.MemoryMiB, MaxMemMiB: s.MaxMemMiB,
		VCPUs: s.VCPUs, VirtMode: s.VirtMode, Qrexec: s.Qrexec}
}

// domainReply answers OpDomain.
type domainReply struct {
	Domain vmlifecycle.Domain `json:"domain"`
	Found  bool               `json:"found"`
}

// consumerToken makes s a valid part of a JetStream consumer name, reversibly: a
// consumer name becomes a directory name, so besides '.', '*', '>' and whitespace
// (forbidden in subjects) '/' and '\' must go too. Everything but [A-Za-z0-9-]
// becomes _XX.
func consumerToken(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9', c == '-':
			b.WriteByte(c)
		default:
			const hex = "0123456789ABCDEF"
			b.Write([]byte{'_', hex[c>>4], hex[c&0xf]})
		}
	}
	return b.String()
}

// validConsumerName mirrors the server's rule for consumer names.
func validConsumerName(name string) error {
	if name == "" || strings.ContainsAny(name, " \t\r\n\f.*>/\\") {
		return errors.New("consumer name must be non-empty without whitespace, '.', '*', '>', '/' or '\\'")
	}
	return nil
}
