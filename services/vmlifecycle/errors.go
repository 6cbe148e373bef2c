package vmlifecycle

import (
	"strconv"
	"strings"

	"github.com/qubesbus/qubesbus/bus/qerr"
)

// qubesd's exceptions of the power operations, with its texts (docs/spec/events.md
// §5.2, docs/spec/methods.md §1.4).

// Default texts that end with the qube's name in Python repr.
var (
	errNotStarted      = withVM(qerr.VMNotStartedError, "Domain is powered off: ")
	errNotRunning      = withVM(qerr.VMNotRunningError, "Domain not running (either powered off or paused): ")
	errNotPaused       = withVM(qerr.VMNotPausedError, "Domain is not paused: ")
	errShutdownTimeout = withVM(qerr.VMShutdownTimeoutError, "Domain shutdown timed out: ")
	errMemory          = withVM(qerr.MemoryError, "Not enough memory to start domain ")
	errNotFound        = withVM(qerr.VMNotFoundError, "No such domain: ")
)

// The shutdown vetoes, which end with the qubes in the way.
var (
	errConnectedVMs = withVMs(qerr.VMInUseError, "There are other VMs connected to this VM: ")
	errGuiVMInUse   = withVMs(qerr.VMError, "There are running VMs using this VM as GuiVM: ")
	errAudioVMInUse = withVMs(qerr.VMInUseError, "There are running VMs using this VM as AudioVM: ")
)

func withVM(class func(string) *qerr.Error, text string) func(vm string) *qerr.Error {
	return func(vm string) *qerr.Error { return class(text + qerr.Repr(vm)) }
}

func withVMs(class func(string) *qerr.Error, text string) func(names []string) *qerr.Error {
	return func(names []string) *qerr.Error { return class(text + strings.Join(names, ", ")) }
}

func errStartFailed(cause string) *qerr.Error {
	return qerr.QubesException("Start failed: " + cause + ", see /var/log/libvirt/libxl/libxl-driver.log for details")
}

func errStartProhibited(rationale string) *qerr.Error {
	return qerr.QubesException("Qube start is prohibited. Rationale: " + rationale)
}

func errQrexec(vm string, timeout int) *qerr.Error {
	return qerr.VMError("Cannot connect to qrexec agent for " + strconv.Itoa(timeout) +
		" seconds, see /var/log/xen/console/guest-" + vm + ".log for details")
}

var (
	errStartDom0    = qerr.VMNotHaltedError("Cannot start Dom0 fake domain!")
	errStartRemote  = qerr.VMNotHaltedError("Cannot start a RemoteVM.")
	errKillDom0     = qerr.VMError("Cannot kill Dom0 fake domain!")
	errKillRemote   = qerr.VMError("Cannot kill a RemoteVM.")
	errSuspendDom0  = qerr.VMError("Cannot suspend Dom0 fake domain!")
	errSuspendRem   = qerr.VMError("Cannot suspend a RemoteVM.")
	errShutdownArgs = qerr.ProtocolError("Argument must match: force, wait")
)
