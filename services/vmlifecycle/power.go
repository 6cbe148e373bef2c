package vmlifecycle

// PowerState is a qube's power state as qubesd reports it (admin.vm.List,
// admin.vm.CurrentState); events.md §5.
type PowerState string

const (
	Halted    PowerState = "Halted"
	Transient PowerState = "Transient"
	Running   PowerState = "Running"
	Paused    PowerState = "Paused"
	Suspended PowerState = "Suspended"
	Halting   PowerState = "Halting"
	Dying     PowerState = "Dying"
	Crashed   PowerState = "Crashed"
	// NA is documented by qubesd but never returned by it.
	NA PowerState = "NA"
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
