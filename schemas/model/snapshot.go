package model

import "github.com/qubesbus/qubesbus/bus/envelope"

// RuntimeSnapshot is the runtime of every qube that is not halted, as the lifecycle
// service saw it, with what a cache of it needs to know.
type RuntimeSnapshot struct {
	Values map[string]Runtime
	// Mark is the lifecycle's runtime mark when the snapshot was taken: the snapshot
	// reflects every change up to it.
	Mark envelope.RuntimeMark
	// ConfigRev is the configuration revision the power states were derived from
	// (RemoteVMs, the qrexec feature).
	ConfigRev uint64
	// Settled is false when an operation was under way while the snapshot was taken:
	// the state may be between two marks, so the snapshot must not be cached.
	Settled bool
}
