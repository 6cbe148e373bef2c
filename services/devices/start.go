package devices

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
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

// startAssignments is what a start checks of a qube: its PCI assignments of any mode
// and its required assignments, class by class in qubesd's order.
func (s *Service) startAssignments(vm string) (pci, required []device.Assignment, err error) {
	err = s.view(nil, func(m *model.Model) error {
		d := m.Domain(vm)
		if d == nil {
			return qerr.VMNotFoundError("No such domain: " + qerr.Repr(vm))
		}
		pci = device.Assigned(d, "pci")
		for _, class := range deviceClasses {
			for _, a := range device.Assigned(d, class) {
				if a.Mode == device.ModeRequired {
					required = append(required, a)
				}
			}
		}
		return nil
	})
	return pci, required, err
}

// requiredOf is a qube's required assignments, class by class in qubesd's order.
func (s *Service) requiredOf(vm string) ([]device.Assignment, error) {
	_, required, err := s.startAssignments(vm)
	return required, err
}

// capitalize is Python's str.capitalize of an ASCII class name.
func capitalize(s string) string {
	if s == "" {
		return s
	}
	return strings.ToUpper(s[:1]) + strings.ToLower(s[1:])
}

// pciRootPort is a PCI port on the host's root bus 00, as qubesd names it (a PCI
// path of one part, with or without its segment 0000).
var pciRootPort = regexp.MustCompile(`\A(?:0000_)?00_([0-9a-f]{2})\.([0-9a-f])\z`)

// missingPCI reports a PCI assignment whose port the host does not have, with
// libvirt's error for it. qubesd resolves such a port to a PCIDevice (the path
// names the root bus, which exists) and reads its identity from libvirt's node
// device pci_0000_00_<dd>_<f> (PCIDevice._load_desc), which raises; nothing catches
// it on the way. Other forms of port (behind a bridge, another segment) resolve
// through sysfs to UnknownDevice in qubesd, and end in an unhandled AttributeError:
// those are left to the required check, which answers "not available".
func missingPCI(inv hostdev.Inventory, a device.Assignment) (string, bool) {
	if a.Class != "pci" || a.Backend != "dom0" || a.Port.ID == device.Any {
		return "", false
	}
	m := pciRootPort.FindStringSubmatch(a.Port.ID)
	if m == nil {
		return "", false
	}
	if _, ok := inv.Find("pci", a.Backend, a.Port.ID); ok {
		return "", false
	}
	return "Node device not found: no node device with matching name 'pci_0000_00_" + m[1] + "_" + m[2] + "'", true
}

// prepareStart is qubesd's device work at the start of a qube, in its order:
//
//   - domain-pre-start, PCI extension: every assigned PCI device, whatever its mode,
//     is looked up to bind it to pciback; one the host does not have fails the start
//     with libvirt's error (a HypervisorError: "Start failed: …" to the caller,
//     the bare text in domain-start-failed, as qubesd's admin.vm.Start wraps it);
//   - right after: every required assignment must match a device its backend
//     exposes now, else QubesException "<Class> device <backend>:<port>:<identity>
//     not available".
func (s *Service) prepareStart(ctx context.Context, vm string) error {
	pci, required, err := s.startAssignments(vm)
	if err != nil || len(pci)+len(required) == 0 {
		return err
	}
	inv, err := s.inventory(ctx)
	if err != nil {
		return err
	}
	for _, a := range pci {
		if msg, ok := missingPCI(inv, a); ok {
			return &devicectl.HypervisorError{Msg: msg}
		}
	}
	for _, a := range required {
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
