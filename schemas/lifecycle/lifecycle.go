// Package lifecycle is the contract of the vmlifecycle service on the bus beside the
// Admin API: power states and runtimes for the other services, qube holds, change
// notices and the admin.vm.Stats stream, with a Client. Nothing here depends on that
// service.
package lifecycle

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/envelope"
	"github.com/qubesbus/qubesbus/bus/rpc"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/schemas/model"
)

// ServiceToken is the service's token in its subjects (subject.Host.Service).
const ServiceToken = string(rpc.VMLifecycle)

// Operations and subjects of the service, each on subject.Host.Service(ServiceToken, op).
const (
	OpStates     = "states"      // map of qube name to power state, for qubes not Halted
	OpRuntime    = "runtime"     // map of qube name to Runtime, with marks (HeaderSettled)
	OpHold       = "hold"        // a HoldRequest: keep a qube's lock
	OpRelease    = "release"     // a ReleaseRequest: end a hold
	OpStatsLease = "stats-lease" // a StatsLeaseRequest: renew or end a stats lease
	// SubjectChanged carries a runtime mark whenever an operation begins or ends.
	SubjectChanged = "changed"
	// SubjectStats carries vm-stats samples (core NATS, not stored).
	SubjectStats = "stats"
)

// MaxHold bounds a hold whose holder never releases it.
const MaxHold = 30 * time.Second

// PowerState is a qube's power state as qubesd reports it (admin.vm.List,
// admin.vm.CurrentState); docs/spec/events.md §5.
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

// Runtime is what a qube's runtime properties show (xid, stubdom_xid, start_time) and
// its power state.
type Runtime struct {
	PowerState PowerState `json:"power_state"`
	XID        int        `json:"xid"`         // -1 when halted
	StubdomXID int        `json:"stubdom_xid"` // -1 without a stub domain
	// StartTime is start_time as qubesd renders it (seconds, as Python prints the float);
	// "" when halted.
	StartTime string `json:"start_time,omitempty"`
	MemoryKiB int64  `json:"memory_kib,omitempty"`
	MaxMemKiB int64  `json:"maxmem_kib,omitempty"`
}

// HaltedRuntime is the runtime of a qube that is not in a Runtimes answer.
var HaltedRuntime = Runtime{PowerState: Halted, XID: -1, StubdomXID: -1}

// HoldRequest asks for a qube's lock.
type HoldRequest struct {
	Name  string `json:"name"`
	TTLMS int64  `json:"ttl_ms,omitempty"`
}

// HoldReply grants it: Mark is the runtime mark once the lock was taken, so that a
// runtime query after the hold reflects the qube's settled state.
type HoldReply struct {
	ID    string `json:"id,omitempty"`
	Mark  string `json:"mark,omitempty"`
	Error string `json:"error,omitempty"`
}

// ReleaseRequest ends a hold once the replica has reached Revision.
type ReleaseRequest struct {
	ID       string `json:"id"`
	Revision uint64 `json:"revision,omitempty"`
}

// StatsStream is the OK content of admin.vm.Stats on the bus.
type StatsStream struct {
	Subject      string `json:"subject"`
	LeaseSubject string `json:"lease_subject"`
	Lease        string `json:"lease"`
	LeaseMS      int64  `json:"lease_ms"`
	IntervalMS   int64  `json:"interval_ms"`
	// Dest is the resolved destination; samples of every qube go to a dom0 stream
	// (DestAdminVM), only Dest's to any other.
	Dest        string `json:"dest"`
	DestAdminVM bool   `json:"dest_adminvm"`
}

// StatsLeaseRequest renews (or with Stop ends) a stats lease.
type StatsLeaseRequest struct {
	Lease string `json:"lease"`
	Stop  bool   `json:"stop,omitempty"`
}

// StatsLeaseReply answers a StatsLeaseRequest.
type StatsLeaseReply struct {
	LeaseMS int64  `json:"lease_ms,omitempty"`
	Error   string `json:"error,omitempty"`
}

// ToModel converts runtimes as the properties model reads them.
func ToModel(rts map[string]Runtime) map[string]model.Runtime {
	out := make(map[string]model.Runtime, len(rts))
	for name, rt := range rts {
		out[name] = model.Runtime{State: string(rt.PowerState), XID: rt.XID, StubdomXID: rt.StubdomXID, StartTime: rt.StartTime}
	}
	return out
}

// HeaderSettled tells, on the runtime endpoint's reply, whether the snapshot may be
// cached (Snapshot.Settled).
const HeaderSettled = "Qubes-Runtime-Settled"

func ParseSettled(v string) (bool, error) {
	switch v {
	case "true":
		return true, nil
	case "", "false":
		return false, nil
	}
	return false, fmt.Errorf("%s %q", HeaderSettled, v)
}

// Client asks a host's lifecycle service for runtime state over NATS.
type Client struct {
	NC   *nats.Conn
	Host subject.Host
}

// PowerStates implements the properties service's PowerStates: the power state of
// every qube that is not Halted.
func (c Client) PowerStates(ctx context.Context) (map[string]string, error) {
	var out map[string]string
	if _, err := c.request(ctx, OpStates, nil, &out); err != nil {
		return nil, fmt.Errorf("ask vmlifecycle for power states: %w", err)
	}
	return out, nil
}

// Runtimes returns the runtime of every qube that is not Halted; a qube missing from
// the answer has HaltedRuntime.
func (c Client) Runtimes(ctx context.Context) (map[string]Runtime, error) {
	var out map[string]Runtime
	if _, err := c.request(ctx, OpRuntime, nil, &out); err != nil {
		return nil, fmt.Errorf("ask vmlifecycle for runtime state: %w", err)
	}
	return out, nil
}

// RuntimeSnapshot implements the properties service's RuntimeSource.
func (c Client) RuntimeSnapshot(ctx context.Context) (model.RuntimeSnapshot, error) {
	var rts map[string]Runtime
	msg, err := c.request(ctx, OpRuntime, nil, &rts)
	if err != nil {
		return model.RuntimeSnapshot{}, fmt.Errorf("ask vmlifecycle for runtime state: %w", err)
	}
	marks, err := envelope.ParseMarks(msg.Header)
	if err != nil {
		return model.RuntimeSnapshot{}, fmt.Errorf("runtime state: %w", err)
	}
	settled, err := ParseSettled(msg.Header.Get(HeaderSettled))
	if err != nil {
		return model.RuntimeSnapshot{}, fmt.Errorf("runtime state: %w", err)
	}
	return model.RuntimeSnapshot{Values: ToModel(rts), Mark: marks.Runtime, ConfigRev: marks.ConfigRev, Settled: settled}, nil
}

// failoverWindow bounds how long a Client request waits for a lifecycle instance
// to serve: while one takes over from another that died, nobody answers for a few
// seconds (the lease's TTL).
const failoverWindow = 15 * time.Second

func (c Client) request(ctx context.Context, op string, data []byte, v any) (*nats.Msg, error) {
	if _, ok := ctx.Deadline(); !ok {
		// A request nobody may answer (a permission denied is silent) must not wait
		// forever.
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 2*failoverWindow)
		defer cancel()
	}
	msg, err := bus.Request(ctx, c.NC, &nats.Msg{Subject: c.Host.Service(ServiceToken, op), Data: data}, failoverWindow)
	if err != nil {
		return nil, err
	}
	if code := msg.Header.Get(micro.ErrorCodeHeader); code != "" {
		return nil, fmt.Errorf("%s %s", code, msg.Header.Get(micro.ErrorHeader))
	}
	return msg, json.Unmarshal(msg.Data, v)
}

// Hold implements the properties service's QubeHolder: it keeps name's lock in the
// lifecycle service until release is called with the configuration revision of the
// change made meanwhile. after is the runtime mark once the lock was held.
func (c Client) Hold(ctx context.Context, name string) (after envelope.RuntimeMark, release func(rev uint64), err error) {
	var rep HoldReply
	if err := c.call(ctx, OpHold, HoldRequest{Name: name, TTLMS: MaxHold.Milliseconds()}, &rep); err != nil {
		return after, nil, fmt.Errorf("hold %s in vmlifecycle: %w", name, err)
	}
	if after, err = envelope.ParseRuntimeMark(rep.Mark); err != nil {
		return after, nil, err
	}
	release = func(rev uint64) {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 15*time.Second)
		defer cancel()
		var out HoldReply
		_ = c.call(rctx, OpRelease, ReleaseRequest{ID: rep.ID, Revision: rev}, &out)
	}
	return after, release, nil
}

// call makes one JSON request to an internal endpoint of the lifecycle service.
func (c Client) call(ctx context.Context, op string, req any, out *HoldReply) error {
	data, err := json.Marshal(req)
	if err != nil {
		return err
	}
	if _, err := c.request(ctx, op, data, out); err != nil {
		return err
	}
	if out.Error != "" {
		return fmt.Errorf("%s", out.Error)
	}
	return nil
}
