package devices

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/qerr"
	"github.com/qubesbus/qubesbus/schemas/device"
	"github.com/qubesbus/qubesbus/schemas/devicectl"
	"github.com/qubesbus/qubesbus/schemas/hostdev"
	"github.com/qubesbus/qubesbus/schemas/model"
)

// requiredOf is a qube's required assignments, class by class in qubesd's order.
func (s *Service) requiredOf(vm string) ([]device.Assignment, error) {
	var out []device.Assignment
	err := s.view(nil, func(m *model.Model) error {
		d := m.Domain(vm)
		if d == nil {
			return qerr.VMNotFoundError("No such domain: " + qerr.Repr(vm))
		}
		for _, class := range deviceClasses {
			for _, a := range device.Assigned(d, class) {
				if a.Mode == device.ModeRequired {
					out = append(out, a)
				}
			}
		}
		return nil
	})
	return out, err
}

// capitalize is Python's str.capitalize of an ASCII class name.
func capitalize(s string) string {
	if s == "" {
		return s
	}
	return strings.ToUpper(s[:1]) + strings.ToLower(s[1:])
}

// prepareStart is qubesd's check in start, right after domain-pre-start: every
// required assignment must match a device its backend exposes now, else
// QubesException "<Class> device <backend>:<port>:<identity> not available".
func (s *Service) prepareStart(ctx context.Context, vm string) error {
	as, err := s.requiredOf(vm)
	if err != nil || len(as) == 0 {
		return err
	}
	inv, err := s.inventory(ctx)
	if err != nil {
		return err
	}
	for _, a := range as {
		found := false
		for _, d := range inv.Devices {
			if matches(a, d) {
				found = true
				break
			}
		}
		if !found {
			return qerr.QubesException(fmt.Sprintf("%s device %s not available", capitalize(a.Port.Class), a.Virtual()))
		}
	}
	return nil
}

// attachRequired attaches the required devices to a created (paused) domain: in
// qubesd they are part of its definition, so no event is fired.
func (s *Service) attachRequired(ctx context.Context, vm string) error {
	as, err := s.requiredOf(vm)
	if err != nil || len(as) == 0 {
		return err
	}
	inv, err := s.inventory(ctx)
	if err != nil {
		return err
	}
	var errs []error
	for _, a := range as {
		for _, d := range inv.Devices {
			if !matches(a, d) {
				continue
			}
			err := s.attachAssigned(ctx, inv, vm, a, d, false)
			if errors.Is(err, hostdev.ErrAttached) {
				err = qerr.DeviceAlreadyAttached(fmt.Sprintf("Device %s already attached to %s", d, d.Attachment))
			}
			errs = append(errs, err)
			inv.Attached = append(inv.Attached, hostdev.Attachment{Port: d.Port, Frontend: vm})
			break
		}
	}
	return errors.Join(errs...)
}

// serveStartOps adds the devicectl endpoints to svc.
func (s *Service) serveStartOps(nc *nats.Conn, svc micro.Service) error {
	for op, f := range map[string]func(context.Context, string) error{
		devicectl.OpPrepareStart:   s.prepareStart,
		devicectl.OpAttachRequired: s.attachRequired,
	} {
		handler := func(r micro.Request) {
			var req devicectl.Request
			var rep devicectl.Reply
			if err := json.Unmarshal(r.Data(), &req); err != nil || req.VM == "" {
				rep = devicectl.Reply{Error: "request must name a vm"}
			} else {
				ctx, cancel := context.WithTimeout(context.Background(), s.cfg.WriteTimeout)
				rep = devicectl.ReplyOf(f(ctx, req.VM))
				cancel()
			}
			_ = r.RespondJSON(rep)
		}
		detached := micro.HandlerFunc(func(r micro.Request) { go handler(bus.Detach(nc, r)) })
		if err := svc.AddEndpoint(op, detached, micro.WithEndpointSubject(s.cfg.Host.Service(devicectl.ServiceToken, op))); err != nil {
			return fmt.Errorf("add %s endpoint: %w", op, err)
		}
	}
	return nil
}
