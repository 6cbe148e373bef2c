// Package hostdev is the hypervisor's device API on the bus: what devices each
// backend of a host exposes right now and which are attached where (runtime state,
// kept by the hypervisor as Xen and the backends' QubesDB keep it), answered by the
// hypervisor service (services/vmlifecycle/hvbus) on qubes.v1.<host>.hv.<op>, and
// asked by the devices service through Client.
package hostdev

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
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/schemas/device"
)

// Operations: the last token of the hypervisor subjects (subject.Host.Hypervisor).
const (
	OpDevices = "devices"       // {} → Inventory
	OpAttach  = "device-attach" // Args{Attach} → {}
	OpDetach  = "device-detach" // Args{Attach} → {}
)

// Attachment is a device attached to a running frontend qube, with the options it
// was attached with (block: read-only, frontend-dev, …).
type Attachment struct {
	device.Port
	Frontend string      `json:"frontend"`
	Options  []device.KV `json:"options,omitempty"`
}

// Inventory is every device the host's backends expose now (Attachment filled in)
// and every attachment.
type Inventory struct {
	Devices  []device.Info `json:"devices"`
	Attached []Attachment  `json:"attached,omitempty"`
	// Boot identifies the hypervisor's boot: it changes when the host restarts, and
	// with it every domain and attachment. What was recorded under another boot is
	// gone ("": the hypervisor does not say).
	Boot string `json:"boot,omitempty"`
}

// Change is what the hypervisor announces on subject.Host.HypervisorDevices after a
// hot-plug or unplug: the backend whose device list changed.
type Change struct {
	Backend string `json:"backend"`
}

// Args is the request body of OpAttach and OpDetach (the "attach" field of the
// hypervisor's call arguments).
type Args struct {
	Attach *Attachment `json:"attach,omitempty"`
}

// Errors a device operation may report (matched with errors.Is on the client side).
var (
	ErrNoDevice        = errors.New("no such device")
	ErrAttached        = errors.New("device already attached")
	ErrNotAttached     = errors.New("device not attached")
	ErrFrontendStopped = errors.New("frontend not running")
)

// Error codes of those errors on the wire (micro error codes).
const (
	CodeNoDevice        = "no-device"
	CodeAttached        = "attached"
	CodeNotAttached     = "not-attached"
	CodeFrontendStopped = "frontend-stopped"
)

// Codes maps each error to its code and back (the server answers Codes.Code, the
// client matches Codes.Err).
var Codes = qerr.Codes{
	{Code: CodeNoDevice, Err: ErrNoDevice}, {Code: CodeAttached, Err: ErrAttached},
	{Code: CodeNotAttached, Err: ErrNotAttached}, {Code: CodeFrontendStopped, Err: ErrFrontendStopped},
}

// Find returns the exposed device at a port.
func (inv Inventory) Find(class, backend, port string) (device.Info, bool) {
	for _, d := range inv.Devices {
		if d.Class == class && d.Backend == backend && d.Port.ID == port {
			return d, true
		}
	}
	return device.Info{}, false
}

// Client asks a host's hypervisor about devices.
type Client struct {
	NC   *nats.Conn
	Host subject.Host
}

const callTimeout = 30 * time.Second

func (c Client) call(ctx context.Context, op string, args any, out any) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, callTimeout)
		defer cancel()
	}
	msg := nats.NewMsg(c.Host.Hypervisor(op))
	var err error
	if msg.Data, err = json.Marshal(args); err != nil {
		return err
	}
	rep, err := bus.Request(ctx, c.NC, msg, 0)
	if err != nil {
		return fmt.Errorf("hypervisor %s: %w", op, err)
	}
	if code := rep.Header.Get(micro.ErrorCodeHeader); code != "" {
		text := string(rep.Data)
		if text == "" {
			text = rep.Header.Get(micro.ErrorHeader)
		}
		if sentinel := Codes.Err(code); sentinel != nil {
			return fmt.Errorf("hypervisor %s: %w: %s", op, sentinel, text)
		}
		return fmt.Errorf("hypervisor %s: %s (%s)", op, text, code)
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(rep.Data, out); err != nil {
		return fmt.Errorf("hypervisor %s reply: %w", op, err)
	}
	return nil
}

// Devices returns what every backend exposes now and what is attached.
func (c Client) Devices(ctx context.Context) (Inventory, error) {
	var inv Inventory
	err := c.call(ctx, OpDevices, struct{}{}, &inv)
	return inv, err
}

// Attach attaches a device to a running frontend.
func (c Client) Attach(ctx context.Context, a Attachment) error {
	return c.call(ctx, OpAttach, Args{Attach: &a}, nil)
}

// Detach detaches a device from its frontend.
func (c Client) Detach(ctx context.Context, a Attachment) error {
	return c.call(ctx, OpDetach, Args{Attach: &a}, nil)
}
