package vmlifecycle

import (
	"strconv"
	"strings"

	"github.com/qubesbus/qubesbus/bus/qerr"
)

// qubesd's exceptions of the power operations, with its texts (events.md §5.2,
// methods.md §1.4).

// Default texts that end with the qube's name in Python repr.
var (
	errNotStarted      = withVM("QubesVMNotStartedError", "Domain is powered off: ")
	errNotRunning      = withVM("QubesVMNotRunningError", "Domain not running (either powered off or paused): ")
	errNotPaused       = withVM("QubesVMNotPausedError", "Domain is not paused: ")
	errShutdownTimeout = withVM("QubesVMShutdownTimeoutError", "Domain shutdown timed out: ")
	errMemory          = withVM("QubesMemoryError", "Not enough memory to start domain ")
	errNotFound        = withVM("QubesVMNotFoundError", "No such domain: ")
)

// The shutdown vetoes, which end with the qubes in the way.
var (
	errConnectedVMs = withVMs("QubesVMInUseError", "There are other VMs connected to this VM: ")
	errGuiVMInUse   = withVMs("QubesVMError", "There are running VMs using this VM as GuiVM: ")
	errAudioVMInUse = withVMs("QubesVMInUseError", "There are running VMs using this VM as AudioVM: ")
)

func withVM(class, text string) func(vm string) *qerr.Error {
	return func(vm string) *qerr.Error { return qerr.New(class, text+qerr.Repr(vm)) }
}

func withVMs(class, text string) func(names []string) *qerr.Error {
	return func(names []string) *qerr.Error { return qerr.New(class, text+strings.Join(names, ", ")) }
}

func errStartFailed(cause string) *qerr.Error {
	return qerr.New("QubesException", "Start failed: "+cause+", see /var/log/libvirt/libxl/libxl-driver.log for details")
}

func errStartProhibited(rationale string) *qerr.Error {
	return qerr.New("QubesException", "Qube start is prohibited. Rationale: "+rationale)
}

func errQrexec(vm string, timeout int) *qerr.Error {
	return qerr.New("QubesVMError", "Cannot connect to qrexec agent for "+strconv.Itoa(timeout)+
		" seconds, see /var/log/xen/console/guest-"+vm+".log for details")
}

var (
	errStartDom0    = qerr.New("QubesVMNotHaltedError", "Cannot start Dom0 fake domain!")
	errStartRemote  = qerr.New("QubesVMNotHaltedError", "Cannot start a RemoteVM.")
	errKillDom0     = qerr.New("QubesVMError", "Cannot kill Dom0 fake domain!")
	errKillRemote   = qerr.New("QubesVMError", "Cannot kill a RemoteVM.")
	errSuspendDom0  = qerr.New("QubesVMError", "Cannot suspend Dom0 fake domain!")
	errSuspendRem   = qerr.New("QubesVMError", "Cannot suspend a RemoteVM.")
	errShutdownArgs = qerr.Protocol("Argument must match: force, wait")
)
