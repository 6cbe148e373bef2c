// Package devicectl is the devices service's contract on the bus beside the Admin
// API: what the lifecycle service asks it while a qube starts (qubesd's device work
// in start: the check of required devices after domain-pre-start, their attachment
// to the created domain), with a Client. Nothing here depends on either service.
//
// The start of a qube cannot learn these answers from events: qubesd fails the
// Start call itself with the device's error, so the lifecycle asks and waits.
package devicectl

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/qerr"
	"github.com/qubesbus/qubesbus/bus/rpc"
	"github.com/qubesbus/qubesbus/bus/subject"
)

// ServiceToken is the service's token in its subjects (subject.Host.Service).
const ServiceToken = string(rpc.Devices)

// Operations, each on subject.Host.Service(ServiceToken, op); the body is a Request,
// the answer a Reply.
const (
	// OpPrepareStart checks the devices of a qube about to start as qubesd does
	// around domain-pre-start (each assigned PCI device exists, every required
	// assignment has a device): the error is the Start's.
	OpPrepareStart = "prepare-start"
	// OpAttachRequired attaches the required devices to the qube's created, still
	// paused domain (in qubesd they are part of the domain's definition: no event).
	OpAttachRequired = "attach-required"
)

// Request names the qube that starts.
type Request struct {
	VM string `json:"vm"`
}

// Reply is empty on success; a Qubes exception travels as its class and message, a
// hypervisor error as Hypervisor, any other failure as Error.
type Reply struct {
	Class      string `json:"class,omitempty"`
	Message    string `json:"message,omitempty"`
	Hypervisor string `json:"hypervisor,omitempty"`
	Error      string `json:"error,omitempty"`
}

// HypervisorError is a libvirt error that qubesd's device code leaves unhandled during
// a start (a PCI device assigned to the qube that the host does not have): it
// reaches admin.vm.Start's handler, which answers QubesException "Start failed:
// <Msg>, see …", while domain-start-failed carries Msg alone.
type HypervisorError struct {
	Msg string
}

func (e *HypervisorError) Error() string { return e.Msg }

// ReplyOf is the reply that carries err.
func ReplyOf(err error) Reply {
	var qe *qerr.Error
	var he *HypervisorError
	switch {
	case err == nil:
		return Reply{}
	case errors.As(err, &he):
		return Reply{Hypervisor: he.Msg}
	case errors.As(err, &qe):
		return Reply{Class: qe.Class, Message: qe.Message}
	default:
		return Reply{Error: err.Error()}
	}
}

// Err is the error a reply carries: a *qerr.Error for a Qubes exception, a
// *HypervisorError for a hypervisor error.
func (r Reply) Err() error {
	switch {
	case r.Class != "":
		return qerr.FromWire(r.Class, r.Message)
	case r.Hypervisor != "":
		return &HypervisorError{Msg: r.Hypervisor}
	case r.Error != "":
		return errors.New(r.Error)
	}
	return nil
}

// Client asks a host's devices service.
type Client struct {
	NC   *nats.Conn
	Host subject.Host
}

// callTimeout bounds a call whose context has no deadline.
const callTimeout = 30 * time.Second

func (c Client) call(ctx context.Context, op, vm string) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, callTimeout)
		defer cancel()
	}
	data, err := json.Marshal(Request{VM: vm})
	if err != nil {
		return err
	}
	msg, err := bus.Request(ctx, c.NC, &nats.Msg{Subject: c.Host.Service(ServiceToken, op), Data: data}, 5*time.Second)
	if err != nil {
		return fmt.Errorf("devices %s: %w", op, err)
	}
	var rep Reply
	if err := json.Unmarshal(msg.Data, &rep); err != nil {
		return fmt.Errorf("devices %s reply: %w", op, err)
	}
	if err := rep.Err(); err != nil {
		var qe *qerr.Error
		var he *HypervisorError
		if errors.As(err, &qe) || errors.As(err, &he) {
			return err
		}
		return fmt.Errorf("devices %s: %w", op, err)
	}
	return nil
}

// PrepareStart implements OpPrepareStart.
func (c Client) PrepareStart(ctx context.Context, vm string) error {
	return c.call(ctx, OpPrepareStart, vm)
}

// AttachRequired implements OpAttachRequired.
func (c Client) AttachRequired(ctx context.Context, vm string) error {
	return c.call(ctx, OpAttachRequired, vm)
}
