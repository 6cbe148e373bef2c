// Package audit is the audit trail: one record for every Admin API call that changes
// the configuration or a qube's power state, and for every refused call, kept on the
// JetStream stream QUBES_AUDIT (subject qubes.v1.<host>.audit) with its own retention.
//
// The gateway writes the records (it alone sees every call and its outcome, and only
// its NATS user may publish on the audit subjects: deploy/nats); `qubesbus audit`
// tails them. A record names the call (source, method, destination, argument), its
// outcome and the request id, never the payload, which can be large or secret: only
// its length.
package audit

import (
	"context"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/qerr"
	"github.com/qubesbus/qubesbus/bus/rpc"
	"github.com/qubesbus/qubesbus/bus/subject"
)

// StreamName is the JetStream stream of every host's audit records.
const StreamName = "QUBES_AUDIT"

// Outcomes of a call, as the client saw it.
const (
	OutcomeOK        = "ok"        // the call succeeded
	OutcomeException = "exception" // it answered a Qubes exception (Record.Exception)
	OutcomeAbort     = "abort"     // the connection closed with no response
)

// Record is one audited call. Its JSON form is what the stream stores and what
// `qubesbus audit --json` prints.
type Record struct {
	// Time is when the outcome was known (the reply came back, or the gateway gave up).
	Time time.Time `json:"time"`
	Host string    `json:"host"`
	// Source, Method, Dest and Arg are the call as the client sent it (dest "dom0"
	// for "keyword adminvm"). They are the client's bytes, not checked: a refused call
	// may carry anything. JSON holds invalid UTF-8 as U+FFFD.
	Source string `json:"source"`
	Method string `json:"method"`
	Dest   string `json:"dest"`
	Arg    string `json:"arg"`
	// Outcome is OutcomeOK, OutcomeException or OutcomeAbort; Exception the class of
	// an exception (empty otherwise).
	Outcome   string `json:"outcome"`
	Exception string `json:"exception,omitempty"`
	// PayloadLen is the length of the payload, which is never recorded (of a request
	// the gateway could not split: the number of bytes it read).
	PayloadLen int `json:"payload_len"`
	// RequestID is the gateway's id of the call (the Qubes-Request-Id of its request
	// on the bus, in the services' logs); also the record's Nats-Msg-Id.
	RequestID string `json:"request_id"`
	// Reason says why the gateway aborted a call itself: a request it could not read
	// or decode (no service saw it), or a call that got no reply.
	Reason string `json:"reason,omitempty"`
}

// Changes reports whether a method changes the configuration or a qube's power state,
// so that every call of it is audited whatever its outcome: a method that saves
// qubes.xml (ChangesConfig) or whose policy class is write or execute. Every power
// method (Start, Shutdown, Kill, Pause, Unpause, Suspend, Resume) is execute in the
// registry; so are the other actions that change state without saving qubes.xml
// (device attach, firewall reload, backup), and notes and the console are write.
func Changes(m rpc.Method) bool { return m.ChangesConfig || m.Access != rpc.Read }

// Refused reports whether an exception class is a refusal: PermissionDenied (the
// access policy) or ProtocolError (qubesd's checks: no such method, an argument,
// payload or destination the method does not take).
func Refused(class string) bool {
	return class == qerr.ErrPermissionDenied.Class || class == qerr.ErrProtocol.Class
}

// Audited is the rule of the audit trail: a call is recorded when its method changes
// state (Changes), whatever the outcome; when it was refused (Refused), whatever the
// method; and when its method is not in the registry (m nil: it can only fail, and
// trying one is worth a trace). Reads that succeed or fail otherwise (a missing qube
// or property) are not recorded.
func Audited(m *rpc.Method, r Record) bool {
	if m == nil || Changes(*m) {
		return true
	}
	return r.Outcome == OutcomeException && Refused(r.Exception)
}

// StreamConfig are the settings of QUBES_AUDIT a deployment may change.
type StreamConfig struct {
	Replicas int           // 1 embedded, 3 in a cluster
	MaxAge   time.Duration // 0 = 90 days
	MaxBytes int64         // 0 = 1 GiB
}

// Defaults of StreamConfig.
const (
	DefaultMaxAge   = 90 * 24 * time.Hour
	DefaultMaxBytes = 1 << 30
)

// EnsureStream creates or updates QUBES_AUDIT. Records cannot be deleted or purged
// through the JetStream API (DenyDelete, DenyPurge: a stream setting that cannot be
// undone); they leave only by age or when the stream is over its size, oldest first.
func EnsureStream(ctx context.Context, js jetstream.JetStream, c StreamConfig) (jetstream.Stream, error) {
	if c.Replicas == 0 {
		c.Replicas = 1
	}
	if c.MaxAge == 0 {
		c.MaxAge = DefaultMaxAge
	}
	if c.MaxBytes == 0 {
		c.MaxBytes = DefaultMaxBytes
	}
	cfg := jetstream.StreamConfig{
		Name:        StreamName,
		Description: "Qubes Admin API audit trail of every host: changes and refused calls",
		Subjects:    []string{subject.AllAudit()},
		Storage:     jetstream.FileStorage,
		Replicas:    c.Replicas,
		MaxAge:      c.MaxAge,
		MaxBytes:    c.MaxBytes,
		// Oldest first: a full stream keeps recording (DiscardNew would stop the trail
		// until records age out). Size MaxBytes for the rate of refused calls a
		// misbehaving qube can cause.
		Discard: jetstream.DiscardOld,
		// Longer than a publisher retries a record (PublisherConfig.RetryFor), so a
		// record resent after a lost ack is stored once.
		Duplicates: 2 * time.Minute,
		DenyDelete: true,
		DenyPurge:  true,
	}
	s, err := bus.RetryJSFor(ctx, nil, "stream "+StreamName, func(ctx context.Context) (jetstream.Stream, error) {
		return js.CreateOrUpdateStream(ctx, cfg)
	})
	if err != nil {
		return nil, fmt.Errorf("ensure stream %s: %w", StreamName, err)
	}
	return s, nil
}
