// Package configstore is the contract of the persistence service on the bus: its operations,
// their messages and errors, and a Client for the other services. The persistence
// service (services/persistence) answers it; nothing here depends on that service.
package configstore

import (
	"errors"

	"github.com/qubesbus/qubesbus/schemas/config"
)

// Operations of the store API, each on subject.Host.Store(op).
const (
	OpSnapshot = "snapshot" // the whole configuration (gzip JSON of a Snapshot)
	OpApply    = "apply"    // a config.Mutation, answered with an ApplyReply (on ApplySubject)
	OpFlush    = "flush"    // a FlushRequest: qubes.xml holds at least the revision
	OpSync     = "sync"     // a SyncRequest: the change log holds the revision durably
	OpMetrics  = "metrics"  // the answering instance's Metrics
)

// Snapshot is the whole configuration at one revision.
type Snapshot struct {
	Revision uint64 `json:"revision"`
	// Sequence is the change-log sequence of the revision's record: a follower reads
	// the log from Sequence+1 on.
	Sequence uint64         `json:"sequence,omitempty"`
	Config   *config.Config `json:"config"`
}

// Metrics are the counters of one persistence instance.
type Metrics struct {
	Revision  uint64 `json:"revision"`
	Sequence  uint64 `json:"sequence"`
	Written   uint64 `json:"written_revision"` // revision qubes.xml holds
	Writes    uint64 `json:"writes"`           // qubes.xml writes
	Appends   uint64 `json:"appends"`          // changes appended by this instance
	Conflicts uint64 `json:"conflicts"`        // appends lost to another instance, then retried
	Synced    uint64 `json:"synced_revision"`  // revision the change log holds durably
	Syncs     uint64 `json:"syncs"`            // syncs of the change log (one per group of appends)
	Refused   uint64 `json:"refused"`          // mutations refused: an op not the caller's (Permits)
}

// FlushRequest asks for qubes.xml to hold at least Revision.
type FlushRequest struct {
	Revision uint64 `json:"revision"`
}

// SyncRequest asks for every change up to Revision to be durable in the change log
// (after an apply with config.Mutation.DeferSync).
type SyncRequest struct {
	Revision uint64 `json:"revision"`
}

// Errors shared by the service and its clients.
var (
	// ErrNotServing: the instance has not started serving yet, or has stopped.
	ErrNotServing = errors.New("persistence is not serving")
	// ErrUnavailable: the change log did not take the change (NATS down, timeout). The
	// change was not applied; in rare cases (a lost ack) it was stored anyway and
	// shows up with the next revision.
	ErrUnavailable = errors.New("config change log unavailable")
	// ErrNotSaved: the change is accepted and in the change log, but it could not be
	// made durable (the log's sync failed) or, for a Flush, writing qubes.xml failed
	// (qubesd too fails the call then, with the change made).
	ErrNotSaved = errors.New("change not saved")
	// ErrRejected wraps a mutation that persistence refused: stale (with
	// config.ErrStaleRevision), invalid (with the config error that refused it) or
	// not the caller's to apply (with ErrNotPermitted).
	ErrRejected = errors.New("mutation rejected")
)
