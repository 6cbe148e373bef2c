package vmlifecycle

import (
	"strconv"
	"strings"

	"github.com/qubesbus/qubesbus/bus/qerr"
)

// qubesd's exceptions of the power operations, with its texts (events.md §5.2,
// methods.md §1.4). Default texts embed the qube name with Python repr.

func errNotStarted(vm string) *qerr.Error {
	return qerr.New("QubesVMNotStartedError", "Domain is powered off: "+qerr.Repr(vm))
}

func errNotRunning(vm string) *qerr.Error {
	return qerr.New("QubesVMNotRunningError", "Domain not running (either powered off or paused): "+qerr.Repr(vm))
}

func errNotPaused(vm string) *qerr.Error {
	return qerr.New("QubesVMNotPausedError", "Domain is not paused: "+qerr.Repr(vm))
}

func errShutdownTimeout(vm string) *qerr.Error {
	return qerr.New("QubesVMShutdownTimeoutError", "Domain shutdown timed out: "+qerr.Repr(vm))
}

func errMemory(vm string) *qerr.Error {
	return qerr.New("QubesMemoryError", "Not enough memory to start domain "+qerr.Repr(vm))
}

func errNotFound(vm string) *qerr.Error {
	return qerr.New("QubesVMNotFoundError", "No such domain: "+qerr.Repr(vm))
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

func errConnectedVMs(names []string) *qerr.Error {
	return qerr.New("QubesVMInUseError", "There are other VMs connected to this VM: "+strings.Join(names, ", "))
}

func errGuiVMInUse(names []string) *qerr.Error {
	return qerr.New("QubesVMError", "There are running VMs using this VM as GuiVM: "+strings.Join(names, ", "))
}

func errAudioVMInUse(names []string) *qerr.Error {
	return qerr.New("QubesVMInUseError", "There are running VMs using this VM as AudioVM: "+strings.Join(names, ", "))
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
