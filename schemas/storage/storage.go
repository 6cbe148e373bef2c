// Package storage is the contract of the storage service on the bus beside the Admin
// API: the volume side of creating, removing and starting a qube, which the
// properties and vmlifecycle services ask for while they serve those calls, with a
// Client; and the lab's fault injection for simulated pools. Nothing here depends on
// that service.
//
// Why calls and not events: qubesd makes a new qube's volumes inside admin.vm.Create
// (a full pool fails the call and the qube is deleted again), removes them before
// admin.vm.Remove answers, and prepares them inside admin.vm.Start (a failure is the
// start's error). A consumer of domain-add or domain-delete events would run after
// the reply, could not fail the call, and a late removal could delete the volumes of
// a new qube of the same name.
package storage

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/qerr"
	"github.com/qubesbus/qubesbus/bus/rpc"
	"github.com/qubesbus/qubesbus/bus/subject"
)

// ServiceToken is the service's token in its subjects (subject.Host.Service).
const ServiceToken = string(rpc.Storage)

// Operations of the service, each on subject.Host.Service(ServiceToken, op), a
// VolumesRequest in, a Reply out.
const (
	// OpCreate makes the volumes of a new qube (qubesd's Storage.create) from the
	// <volume-config> it is about to be added with; on failure nothing is left.
	OpCreate = "create"
	// OpRemove removes the volumes (images, revisions) of a qube just removed from
	// the configuration, from the <volume-config> it had; failures are logged, as
	// qubesd logs them, and the reply is OK.
	OpRemove = "remove"
	// OpVerify checks the volumes of a qube about to start (Storage.verify, right
	// after the device check and before its netvm starts): a missing image is the
	// start's error. It changes nothing.
	OpVerify = "verify"
	// OpPrepare prepares the volumes of a qube about to start (Storage.start); on
	// failure the volumes it prepared are as before.
	OpPrepare = "prepare"
	// OpStop stops the volumes of a qube whose start failed after OpPrepare (the
	// domain could not be created), as qubesd's start calls Storage.stop then: a
	// save_on_stop volume commits, the others are dropped.
	OpStop = "stop"
)

// LabOpFaults is the lab operation (subject.Host.Lab) that sets the faults of the
// host's simulated pools: a LabFaults in, a LabReply out.
const LabOpFaults = ServiceToken + "-faults"

// VolumesRequest names a qube and, for create and remove, its volume settings.
type VolumesRequest struct {
	Qube string `json:"qube"`
	// VolumeConfig is the qube's <volume-config> element (create and remove: the
	// replica may no longer, or not yet, hold it).
	VolumeConfig string `json:"volume_config,omitempty"`
	// Revision is the configuration revision the caller planned on: the service's
	// replica waits for it, so it knows the pools the volumes name.
	Revision uint64 `json:"revision,omitempty"`
}

// Reply answers every operation: empty when it succeeded, else a qubesd exception
// (Class and Message) or Abort, the cause of an error qubesd does not handle.
type Reply struct {
	Class   string `json:"class,omitempty"`
	Message string `json:"message,omitempty"`
	Abort   string `json:"abort,omitempty"`
}

// ReplyFor is the Reply of err.
func ReplyFor(err error) Reply {
	if err == nil {
		return Reply{}
	}
	var qe *qerr.Error
	if errors.As(err, &qe) && !errors.Is(err, qerr.ErrAbort) {
		return Reply{Class: qe.Class, Message: qe.Message}
	}
	return Reply{Abort: err.Error()}
}

// Err is the error a Reply stands for: a *qerr.Error, an error wrapping qerr.ErrAbort,
// or nil.
func (r Reply) Err() error {
	switch {
	case r.Class != "":
		return qerr.FromWire(r.Class, r.Message)
	case r.Abort != "":
		return qerr.Abort(r.Abort)
	}
	return nil
}

// LabFaultSpec are the faults of one simulated pool.
type LabFaultSpec struct {
	// Full makes every operation that writes data (create, snapshot or reset on
	// start, import, resize up) fail as a full thin pool does.
	Full bool `json:"full,omitempty"`
	// CloneDelayMS delays every copy of a volume's data (a clone, a start's
	// snapshot) by this long.
	CloneDelayMS int64 `json:"clone_delay_ms,omitempty"`
	// ResizeFails makes a resize fail with this message (a StoragePoolException).
	ResizeFails string `json:"resize_fails,omitempty"`
}

// LabFaults replaces the faults of one pool ({} clears them).
type LabFaults struct {
	Pool   string       `json:"pool"`
	Faults LabFaultSpec `json:"faults"`
}

// LabReply answers a lab request.
type LabReply struct {
	Error string `json:"error,omitempty"`
}

// Client asks a host's storage service for the volume side of qube operations.
type Client struct {
	NC   *nats.Conn
	Host subject.Host
}

// requestWindow bounds how long a request waits for an instance to serve (one that
// is restarting).
const requestWindow = 15 * time.Second

// requestTimeout bounds one request (the storage's own writes are bounded by its
// WriteTimeout, 30 s by default).
const requestTimeout = 45 * time.Second

// CreateVolumes makes the volumes of a new qube.
func (c Client) CreateVolumes(ctx context.Context, qube, volumeConfig string, rev uint64) error {
	return c.call(ctx, OpCreate, VolumesRequest{Qube: qube, VolumeConfig: volumeConfig, Revision: rev})
}

// RemoveVolumes removes the volumes of a removed qube.
func (c Client) RemoveVolumes(ctx context.Context, qube, volumeConfig string, rev uint64) error {
	return c.call(ctx, OpRemove, VolumesRequest{Qube: qube, VolumeConfig: volumeConfig, Revision: rev})
}

// VerifyStart checks a qube's volumes before its start.
func (c Client) VerifyStart(ctx context.Context, qube string) error {
	return c.call(ctx, OpVerify, VolumesRequest{Qube: qube})
}

// PrepareStart prepares a qube's volumes for its start.
func (c Client) PrepareStart(ctx context.Context, qube string) error {
	return c.call(ctx, OpPrepare, VolumesRequest{Qube: qube})
}

// StopVolumes stops a qube's volumes after a start that failed once they were
// prepared.
func (c Client) StopVolumes(ctx context.Context, qube string) error {
	return c.call(ctx, OpStop, VolumesRequest{Qube: qube})
}

func (c Client) call(ctx context.Context, op string, req VolumesRequest) error {
	// An instance killed while it serves the request never answers: bound the wait.
	ctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	data, err := json.Marshal(req)
	if err != nil {
		return err
	}
	msg, err := bus.Request(ctx, c.NC, &nats.Msg{Subject: c.Host.Service(ServiceToken, op), Data: data}, requestWindow)
	if err != nil {
		return fmt.Errorf("%w: storage %s of %s: %w", qerr.ErrAbort, op, req.Qube, err)
	}
	if code := msg.Header.Get(micro.ErrorCodeHeader); code != "" {
		return fmt.Errorf("%w: storage %s of %s: %s %s", qerr.ErrAbort, op, req.Qube, code, msg.Header.Get(micro.ErrorHeader))
	}
	var rep Reply
	if err := json.Unmarshal(msg.Data, &rep); err != nil {
		return fmt.Errorf("%w: storage %s of %s: %w", qerr.ErrAbort, op, req.Qube, err)
	}
	return rep.Err()
}

// LabClient sets the faults of a host's simulated pools (a lab's connection).
type LabClient struct {
	NC   *nats.Conn
	Host subject.Host
}

// SetFaults replaces the faults of the simulated pool named pool on every storage
// instance that answers within the request (the first answer is returned; every
// instance receives the request).
func (c LabClient) SetFaults(ctx context.Context, pool string, spec LabFaultSpec) error {
	data, err := json.Marshal(LabFaults{Pool: pool, Faults: spec})
	if err != nil {
		return err
	}
	msg, err := c.NC.RequestWithContext(ctx, c.Host.Lab(LabOpFaults), data)
	if err != nil {
		return fmt.Errorf("storage lab faults: %w", err)
	}
	var rep LabReply
	if err := json.Unmarshal(msg.Data, &rep); err != nil {
		return fmt.Errorf("storage lab faults: %w", err)
	}
	if rep.Error != "" {
		return fmt.Errorf("storage lab faults: %s", rep.Error)
	}
	return nil
}

// Operations a backup reads volumes with (qubesd's Volume.export): OpExport answers an
// ExportReply (the size and data regions of a volume's committed data, what a backup
// stores), OpRead an ExportReply whose Data is one range of it. Both take an
// ExportRequest. A running qube's save_on_stop volume exports its data from before
// the start, as in qubesd. A volume whose data was never written (a fixture's qube,
// or any volume of a simulated pool, which keeps no content) exports as holes only.
const (
	OpExport = "export"
	OpRead   = "read"
)

// MaxRead bounds one OpRead (the reply stays well under NATS's default 1 MiB
// payload limit once base64-encoded in JSON).
const MaxRead = 256 << 10

// ExportRequest names a volume of a qube; Offset and Length are OpRead's range.
type ExportRequest struct {
	Qube   string `json:"qube"`
	Volume string `json:"volume"`
	Offset int64  `json:"offset,omitempty"`
	Length int64  `json:"length,omitempty"`
}

// Extent is a data region of a volume; the rest reads as zeros.
type Extent struct {
	Offset int64 `json:"offset"`
	Length int64 `json:"length"`
}

// ExportReply answers OpExport (Size, Extents) and OpRead (Data).
type ExportReply struct {
	Reply
	Size    int64    `json:"size,omitempty"`
	Usage   int64    `json:"usage,omitempty"` // the pool's usage of the volume (qubesd's volume.usage)
	Extents []Extent `json:"extents,omitempty"`
	Data    []byte   `json:"data,omitempty"`
}

// ExportVolume returns the size, usage and data regions of a qube's volume.
func (c Client) ExportVolume(ctx context.Context, qube, volume string) (ExportReply, error) {
	return c.export(ctx, OpExport, ExportRequest{Qube: qube, Volume: volume})
}

// ReadVolume reads len(p) bytes (at most MaxRead) of a qube's volume at off.
func (c Client) ReadVolume(ctx context.Context, qube, volume string, p []byte, off int64) (int, error) {
	if len(p) > MaxRead {
		p = p[:MaxRead]
	}
	rep, err := c.export(ctx, OpRead, ExportRequest{Qube: qube, Volume: volume, Offset: off, Length: int64(len(p))})
	if err != nil {
		return 0, err
	}
	return copy(p, rep.Data), nil
}

func (c Client) export(ctx context.Context, op string, req ExportRequest) (ExportReply, error) {
	ctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	data, err := json.Marshal(req)
	if err != nil {
		return ExportReply{}, err
	}
	what := req.Qube + ":" + req.Volume
	msg, err := bus.Request(ctx, c.NC, &nats.Msg{Subject: c.Host.Service(ServiceToken, op), Data: data}, requestWindow)
	if err != nil {
		return ExportReply{}, fmt.Errorf("%w: storage %s of %s: %w", qerr.ErrAbort, op, what, err)
	}
	if code := msg.Header.Get(micro.ErrorCodeHeader); code != "" {
		return ExportReply{}, fmt.Errorf("%w: storage %s of %s: %s %s", qerr.ErrAbort, op, what, code, msg.Header.Get(micro.ErrorHeader))
	}
	var rep ExportReply
	if err := json.Unmarshal(msg.Data, &rep); err != nil {
		return ExportReply{}, fmt.Errorf("%w: storage %s of %s: %w", qerr.ErrAbort, op, what, err)
	}
	return rep, rep.Err()
}
