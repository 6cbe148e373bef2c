package vmlifecycle

import (
	"context"

	"github.com/qubesbus/qubesbus/bus/cloudevent"
)

// Publisher stores events in the host's event stream, in order, and returns once they
// are stored (*cloudevent.Publisher).
type Publisher interface {
	Publish(ctx context.Context, events ...cloudevent.Event) error
}

// The lifecycle's events with qubesd's keyword arguments in qubesd's order
// (docs/spec/events.md §2.2). pyBool renders a Python bool.
func pyBool(b bool) string {
	if b {
		return "True"
	}
	return "False"
}

func evPreStart(vm string) cloudevent.Event {
	return cloudevent.New(vm, "domain-pre-start", "start_guid", "True", "mem_required", "None")
}
func evVerifyFiles(vm string) cloudevent.Event { return cloudevent.New(vm, "domain-verify-files") }
func evStartFailed(vm, reason string) cloudevent.Event {
	return cloudevent.New(vm, "domain-start-failed", "reason", reason)
}
func evPreSpawn(vm string) cloudevent.Event {
	return cloudevent.New(vm, "domain-pre-spawn", "start_guid", "True")
}
func evSpawn(vm string) cloudevent.Event {
	return cloudevent.New(vm, "domain-spawn", "start_guid", "True")
}
func evQdbCreate(vm string) cloudevent.Event   { return cloudevent.New(vm, "domain-qdb-create") }
func evPreUnpaused(vm string) cloudevent.Event { return cloudevent.New(vm, "domain-pre-unpaused") }
func evUnpaused(vm string) cloudevent.Event    { return cloudevent.New(vm, "domain-unpaused") }
func evStart(vm string) cloudevent.Event {
	return cloudevent.New(vm, "domain-start", "start_guid", "True")
}
func evPreShutdown(vm string, force bool) cloudevent.Event {
	return cloudevent.New(vm, "domain-pre-shutdown", "force", pyBool(force))
}
func evShutdownFailed(vm, reason string) cloudevent.Event {
	return cloudevent.New(vm, "domain-shutdown-failed", "reason", reason)
}
func evStopped(vm string) cloudevent.Event   { return cloudevent.New(vm, "domain-stopped") }
func evShutdown(vm string) cloudevent.Event  { return cloudevent.New(vm, "domain-shutdown") }
func evPrePaused(vm string) cloudevent.Event { return cloudevent.New(vm, "domain-pre-paused") }
func evPaused(vm string) cloudevent.Event    { return cloudevent.New(vm, "domain-paused") }
func evResumed(vm string) cloudevent.Event   { return cloudevent.New(vm, "domain-resumed") }
func evPreDelete(vm string) cloudevent.Event {
	return cloudevent.New("", "domain-pre-delete", "vm", vm)
}
func evDelete(vm string) cloudevent.Event { return cloudevent.New("", "domain-delete", "vm", vm) }

// runtimeResets are fired when a domain appears or goes: the values of xid,
// stubdom_xid and start_time changed.
func runtimeResets(vm string) []cloudevent.Event {
	return []cloudevent.Event{
		cloudevent.New(vm, "property-reset:xid", "name", "xid"),
		cloudevent.New(vm, "property-reset:stubdom_xid", "name", "stubdom_xid"),
		cloudevent.New(vm, "property-reset:start_time", "name", "start_time"),
	}
}

// stopEvents is what a subscriber sees when a domain stopped, whatever the cause.
func stopEvents(vm string) []cloudevent.Event {
	evs := []cloudevent.Event{evStopped(vm)}
	evs = append(evs, runtimeResets(vm)...)
	return append(evs, evShutdown(vm))
}
