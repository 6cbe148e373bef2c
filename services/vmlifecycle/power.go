package vmlifecycle

import "github.com/qubesbus/qubesbus/schemas/lifecycle"

// PowerState is a qube's power state as qubesd reports it.
type PowerState = lifecycle.PowerState

// The power states.
const (
	Halted    = lifecycle.Halted
	Transient = lifecycle.Transient
	Running   = lifecycle.Running
	Paused    = lifecycle.Paused
	Suspended = lifecycle.Suspended
	Halting   = lifecycle.Halting
	Dying     = lifecycle.Dying
	Crashed   = lifecycle.Crashed
	NA        = lifecycle.NA
)

// powerOf derives the power state of a qube from its domain (nil: none active), as
// qubesd's get_power_state does; qrexec says the qube has the qrexec feature (own or
// through its template), which makes a running domain Transient until its agent
// connects.
func powerOf(d *Domain, qrexec bool) PowerState {
	if d == nil {
		return Halted
	}
	switch d.State {
	case HVPaused:
		return Paused
	case HVCrashed:
		return Crashed
	case HVShutdown:
		return Halting
	case HVShutoff:
		return Dying
	case HVPMSuspended:
		return Suspended
	}
	if qrexec && !d.AgentConnected {
		return Transient
	}
	return Running
}
