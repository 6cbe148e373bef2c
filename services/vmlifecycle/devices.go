package vmlifecycle

import (
	"context"
	"errors"
	"fmt"

	"github.com/qubesbus/qubesbus/bus/qerr"
	"github.com/qubesbus/qubesbus/schemas/devicectl"
)

// Devices is what a start asks the devices service (devicectl.Client): qubesd checks
// a qube's required devices right after domain-pre-start and fails the Start with
// the device's error, so this is a call, not an event.
type Devices interface {
	// PrepareStart fails with the Start's error if a required device is missing.
	PrepareStart(ctx context.Context, vm string) error
	// AttachRequired attaches the required devices to the created, paused domain.
	AttachRequired(ctx context.Context, vm string) error
}

// checkRequiredDevices is the start's device check; a Qubes exception or a
// hypervisor error (devicectl.HypervisorError) is the Start's answer, any other
// failure aborts it.
func (s *Service) checkRequiredDevices(ctx context.Context, name string) error {
	if !s.requiresDevices(name) {
		return nil
	}
	return devicesErr(s.cfg.Devices.PrepareStart(ctx, name), "check required devices of "+name)
}

// attachRequiredDevices attaches them once the domain exists.
func (s *Service) attachRequiredDevices(ctx context.Context, name string) *qerr.Error {
	if !s.requiresDevices(name) {
		return nil
	}
	err := s.cfg.Devices.AttachRequired(ctx, name)
	if err == nil {
		return nil
	}
	var qe *qerr.Error
	if errors.As(err, &qe) {
		return qe
	}
	return errStartFailed(err.Error())
}

// requiresDevices: only a qube with a required assignment asks the devices service,
// so a start costs no extra round trip otherwise and does not depend on that service.
func (s *Service) requiresDevices(name string) bool {
	if s.cfg.Devices == nil {
		return false
	}
	q, ok := s.inv.Qube(name)
	return !ok || q.RequiresDevices
}

func devicesErr(err error, what string) error {
	if err == nil {
		return nil
	}
	var qe *qerr.Error
	var he *devicectl.HypervisorError
	if errors.As(err, &qe) || errors.As(err, &he) {
		return err
	}
	return fmt.Errorf("%w: %s: %w", qerr.ErrAbort, what, err)
}
