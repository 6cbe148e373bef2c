package devices

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"

	"github.com/qubesbus/qubesbus/bus/cloudevent"
	"github.com/qubesbus/qubesbus/bus/qerr"
	"github.com/qubesbus/qubesbus/bus/rpc"
	"github.com/qubesbus/qubesbus/schemas/config"
	"github.com/qubesbus/qubesbus/schemas/device"
	"github.com/qubesbus/qubesbus/schemas/hostdev"
	"github.com/qubesbus/qubesbus/schemas/model"
)

// deviceClasses are the classes whose methods this service serves.
var deviceClasses = []string{"pci", "block"}

// lines joins keyed lines sorted by key, each "key text\n" (qubesd sorts the dict
// keys of its listings).
func sortedLines(m map[string]string) []byte {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for _, k := range keys {
		b.WriteString(k)
		b.WriteByte(' ')
		b.WriteString(m[k])
		b.WriteByte('\n')
	}
	return []byte(b.String())
}

func (s *Service) inventory(ctx context.Context) (hostdev.Inventory, error) {
	inv, err := s.hv.Devices(ctx)
	if err != nil {
		return inv, fmt.Errorf("%w: host devices: %w", qerr.ErrAbort, err)
	}
	if s.records != nil {
		s.records.seeBoot(inv.Boot)
	}
	return inv, nil
}

func (s *Service) available(class string) rpc.Handler {
	return func(ctx context.Context, c *rpc.Call) ([]byte, error) {
		if c.Dest.Class == "RemoteVM" {
			return nil, nil
		}
		inv, err := s.inventory(ctx)
		if err != nil {
			return nil, err
		}
		out := map[string]string{}
		for _, d := range inv.Devices {
			if d.Class != class || d.Backend != c.Dest.Name || (c.Arg != "" && d.Port.ID != c.Arg) {
				continue
			}
			out[d.Key()] = d.Serialize()
		}
		return sortedLines(out), nil
	}
}

// selectPort is qubesd's filter of Assigned and Attached by an argument
// "backend+port_id" (no '+': an unhandled error, the call is aborted).
func selectPort(arg string) (backend, port string, err error) {
	backend, port, ok := strings.Cut(arg, "+")
	if !ok {
		return "", "", qerr.Abort("device argument without '+'")
	}
	return backend, port, nil
}

func (s *Service) assignedOf(vm, class string) ([]device.Assignment, error) {
	var as []device.Assignment
	err := s.view(nil, func(m *model.Model) error {
		d := m.Domain(vm)
		if d == nil {
			return qerr.VMNotFoundError("No such domain: " + qerr.Repr(vm))
		}
		as = device.Assigned(d, class)
		return nil
	})
	return as, err
}

func (s *Service) assigned(class string) rpc.Handler {
	return func(ctx context.Context, c *rpc.Call) ([]byte, error) {
		if c.Dest.Class == "RemoteVM" {
			return nil, nil
		}
		as, err := s.assignedOf(c.Dest.Name, class)
		if err != nil {
			return nil, err
		}
		return listAssignments(as, c.Arg)
	}
}

func listAssignments(as []device.Assignment, arg string) ([]byte, error) {
	if arg != "" {
		backend, port, err := selectPort(arg)
		if err != nil {
			return nil, err
		}
		as = slices.DeleteFunc(slices.Clone(as), func(a device.Assignment) bool {
			return a.Backend != backend || a.Port.ID != port
		})
		if len(as) > 1 {
			return nil, qerr.DeviceNotFound("")
		}
	}
	out := map[string]string{}
	for _, a := range as {
		out[a.Key()] = a.Serialize()
	}
	return sortedLines(out), nil
}

// attachedTo is qubesd's get_attached_devices of a qube: each device attached to it,
// as the assignment it matches (with that assignment's mode and options) or as a
// manual one with the options it was attached with; the device id is the device's.
func attachedTo(inv hostdev.Inventory, as []device.Assignment, vm, class string) []device.Assignment {
	var out []device.Assignment
	for _, at := range inv.Attached {
		if at.Frontend != vm || at.Class != class {
			continue
		}
		devid := "*"
		if info, ok := inv.Find(at.Class, at.Backend, at.Port.ID); ok {
			devid = info.Identity()
		}
		a := device.Assignment{Port: at.Port, DeviceID: devid, Mode: device.ModeManual, Frontend: vm, Options: at.Options}
		for _, x := range as {
			if x.Port == at.Port && x.DeviceID == devid {
				a = x
				a.Frontend = vm
				break
			}
		}
		out = append(out, a)
	}
	return out
}

func (s *Service) attached(class string) rpc.Handler {
	return func(ctx context.Context, c *rpc.Call) ([]byte, error) {
		if c.Dest.Class == "RemoteVM" {
			return nil, nil
		}
		as, err := s.assignedOf(c.Dest.Name, class)
		if err != nil {
			return nil, err
		}
		inv, err := s.inventory(ctx)
		if err != nil {
			return nil, err
		}
		return listAssignments(attachedTo(inv, as, c.Dest.Name, class), c.Arg)
	}
}

// target reads the device an argument names (qubesd's load_device_info): a
// malformed argument or an unknown backend is an unhandled error in qubesd (abort).
func (s *Service) target(arg, class string) (device.Assignment, error) {
	a, err := device.ParseQarg(arg, class)
	if err != nil {
		return a, fmt.Errorf("%w: %w", qerr.ErrAbort, err)
	}
	if a.Backend != device.Any && !s.exists(a.Backend) {
		return a, qerr.Abort("no such backend qube " + a.Backend)
	}
	return a, nil
}

// lookupPCI is the rest of qubesd's load_device_info for Assign and Attach: an
// argument naming both a PCI port and an identity makes it read the identity of the
// device at that port from libvirt, which fails for a port the host does not have.
// qubesd leaves that libvirtError unhandled (the connection closes with no answer);
// here it is answered as QubesException with libvirt's text, as a start shows it, so
// the tool says why. qubesd's Unassign and Detach make the same lookup and abort
// too; here they do not, so an assignment of a device that is gone can be removed.
func (s *Service) lookupPCI(ctx context.Context, dev device.Assignment) error {
	if dev.Class != "pci" || dev.DeviceID == device.Any {
		return nil
	}
	if !pciRootPort.MatchString(dev.Port.ID) {
		return nil
	}
	inv, err := s.inventory(ctx)
	if err != nil {
		return err
	}
	if msg, ok := missingPCI(inv, dev); ok {
		return qerr.QubesException(msg)
	}
	return nil
}

func (s *Service) exists(vm string) bool {
	found := false
	_ = s.view(nil, func(m *model.Model) error {
		found = m.Domain(vm) != nil
		return nil
	})
	return found
}

// parsePayload reads an Assign or Attach payload; a frontend_domain must name a qube.
func (s *Service) parsePayload(payload []byte, expected device.Assignment) (device.Assignment, error) {
	a, err := device.ParseAssignment(payload, expected)
	var pe *device.ProtocolError
	if errors.As(err, &pe) {
		return a, qerr.ProtocolError(pe.Msg)
	}
	if err != nil {
		return a, err
	}
	if a.Frontend != "" && !s.exists(a.Frontend) {
		return a, qerr.ProtocolError("No such domain: " + qerr.Repr(a.Frontend))
	}
	return a, nil
}

func deviceEvent(vm, name string, dev string, opts []device.KV) cloudevent.Event {
	return cloudevent.New(vm, name, "device", dev, "options", device.OptionsRepr(opts))
}

// setAssignments is the op that stores a qube's assignments of a class.
func setAssignments(d *config.Domain, class string, as []device.Assignment) config.Op {
	return config.Op{Kind: config.OpSetDevices, Domain: d.ID, Name: class, Value: string(device.MarshalDevices(class, as))}
}

// assign adds a persistent assignment. Assigning with mode manual is an unhandled
// ValueError in qubesd (no answer); here it is answered with QubesValueError and
// qubesd's message.
func (s *Service) assign(class string) rpc.Handler {
	return func(ctx context.Context, c *rpc.Call) ([]byte, error) {
		dev, err := s.target(c.Arg, class)
		if err != nil {
			return nil, err
		}
		if err := s.lookupPCI(ctx, dev); err != nil {
			return nil, err
		}
		a, err := s.parsePayload(c.Payload, dev)
		if err != nil {
			return nil, err
		}
		a.Frontend = c.Dest.Name
		return nil, s.change(ctx, true, func(m *model.Model, pre func(...cloudevent.Event) error) ([]config.Op, []cloudevent.Event, error) {
			d := m.Domain(c.Dest.Name)
			as := device.Assigned(d, class)
			for _, x := range as {
				if x.Port == a.Port && x.DeviceID == a.DeviceID {
					return nil, nil, qerr.DeviceAlreadyAssigned(fmt.Sprintf("%s device %s already assigned to %s", class, a.Virtual(), c.Dest.Name))
				}
			}
			if a.Mode == device.ModeManual {
				return nil, nil, qerr.ValueError("Only auto-attachable devices can be assigned.")
			}
			if err := pre(deviceEvent(c.Dest.Name, "device-pre-assign:"+class, a.Virtual(), a.Options)); err != nil {
				return nil, nil, err
			}
			op := setAssignments(d, class, append(slices.Clone(as), a))
			return []config.Op{op}, []cloudevent.Event{deviceEvent(c.Dest.Name, "device-assign:"+class, a.Virtual(), a.Options)}, nil
		})
	}
}

func (s *Service) unassign(class string) rpc.Handler {
	return func(ctx context.Context, c *rpc.Call) ([]byte, error) {
		dev, err := s.target(c.Arg, class)
		if err != nil {
			return nil, err
		}
		return nil, s.change(ctx, true, func(m *model.Model, _ func(...cloudevent.Event) error) ([]config.Op, []cloudevent.Event, error) {
			d := m.Domain(c.Dest.Name)
			as := device.Assigned(d, class)
			i := slices.IndexFunc(as, func(x device.Assignment) bool { return x.Port == dev.Port && x.DeviceID == dev.DeviceID })
			if i < 0 {
				return nil, nil, qerr.DeviceNotAssigned(fmt.Sprintf("%s device %s not assigned to %s", class, dev.Virtual(), c.Dest.Name))
			}
			gone := as[i]
			op := setAssignments(d, class, slices.Delete(slices.Clone(as), i, i+1))
			return []config.Op{op}, []cloudevent.Event{cloudevent.New(c.Dest.Name, "device-unassign:"+class, "device", gone.Virtual())}, nil
		})
	}
}

var assignmentModes = map[string]bool{device.ModeRequired: true, device.ModeAsk: true, device.ModeAuto: true}

func (s *Service) setAssignment(class string) rpc.Handler {
	return func(ctx context.Context, c *rpc.Call) ([]byte, error) {
		mode := string(c.Payload)
		if !assignmentModes[mode] {
			return nil, qerr.UnrecognizedDeviceAssignmentMode("Invalid assignment mode")
		}
		dev, err := s.target(c.Arg, class)
		if err != nil {
			return nil, err
		}
		return nil, s.change(ctx, true, func(m *model.Model, pre func(...cloudevent.Event) error) ([]config.Op, []cloudevent.Event, error) {
			d := m.Domain(c.Dest.Name)
			as := device.Assigned(d, class)
			i := slices.IndexFunc(as, func(x device.Assignment) bool { return x.Port == dev.Port && x.DeviceID == dev.DeviceID })
			if i < 0 {
				return nil, nil, qerr.ValueError(fmt.Sprintf("Device %s not assigned to %s", dev.Virtual(), c.Dest.Name))
			}
			if as[i].Mode == mode {
				return nil, nil, nil
			}
			if err := pre(deviceEvent(c.Dest.Name, "device-pre-assign:"+class, dev.Virtual(), as[i].Options)); err != nil {
				return nil, nil, err
			}
			as = slices.Clone(as)
			as[i].Mode = mode
			return []config.Op{setAssignments(d, class, as)},
				[]cloudevent.Event{cloudevent.New(c.Dest.Name, "device-assignment-changed:"+class, "device", dev.Virtual())}, nil
		})
	}
}

// running reports whether a qube is not halted (qubesd's not is_halted()).
func (s *Service) halted(ctx context.Context, vm string) (bool, *model.Model, error) {
	rt, err := s.runtime(ctx)
	if err != nil {
		return false, nil, err
	}
	var halted bool
	var mdl *model.Model
	err = s.view(rt, func(m *model.Model) error {
		halted = m.PowerState(vm) == "Halted"
		mdl = m
		return nil
	})
	return halted, mdl, err
}

func (s *Service) attach(class string) rpc.Handler {
	return func(ctx context.Context, c *rpc.Call) ([]byte, error) {
		dev, err := s.target(c.Arg, class)
		if err != nil {
			return nil, err
		}
		if err := s.lookupPCI(ctx, dev); err != nil {
			return nil, err
		}
		a, err := s.parsePayload(c.Payload, dev)
		if err != nil {
			return nil, err
		}
		s.wmu.Lock()
		defer s.wmu.Unlock()
		rt, err := s.runtime(ctx)
		if err != nil {
			return nil, err
		}
		var halted bool
		var virtMode string
		var as []device.Assignment
		_ = s.view(rt, func(m *model.Model) error {
			halted = m.PowerState(c.Dest.Name) == "Halted"
			if h, err := m.Holder(c.Dest.Name); err == nil {
				if v, ok := m.Value(h, "virt_mode"); ok {
					virtMode = v.Text
				}
				as = device.Assigned(h.D, class)
			}
			return nil
		})
		if halted {
			return nil, qerr.VMNotRunningError("VM not running, cannot attach device, do you mean `assign`?")
		}
		inv, err := s.inventory(ctx)
		if err != nil {
			return nil, err
		}
		// qubesd's attach reads the device's identity (assignment.device), which
		// fails for a PCI port the host does not have (see lookupPCI).
		if msg, ok := missingPCI(inv, a); ok {
			return nil, qerr.QubesException(msg)
		}
		var found []device.Info
		for _, d := range inv.Devices {
			if d.Class == class && d.Backend == a.Backend && (a.Port.ID == device.Any || d.Port.ID == a.Port.ID) &&
				(a.DeviceID == device.Any || d.Identity() == a.DeviceID) {
				found = append(found, d)
			}
		}
		if len(found) != 1 {
			return nil, qerr.ProtocolError(fmt.Sprintf("Cannot attach ambiguous %s device.", class))
		}
		info := found[0]
		for _, x := range attachedTo(inv, as, c.Dest.Name, class) {
			if x.Port == info.Port && x.DeviceID == info.Identity() {
				return nil, qerr.DeviceAlreadyAttached(fmt.Sprintf("device %s of class %s already attached to %s", info, class, c.Dest.Name))
			}
		}
		opts := slices.Clone(a.Options)
		if err := s.publish(ctx, deviceEvent(c.Dest.Name, "device-pre-attach:"+class, info.String(), opts)); err != nil {
			return nil, err
		}
		switch class {
		case "block":
			opts, err = blockOptions(inv, info, c.Dest.Name, opts)
		case "pci":
			switch {
			case c.Dest.Class == "AdminVM":
				err = qerr.QubesException("Can't attach PCI device to dom0")
			case virtMode == "pvh":
				err = qerr.QubesException("Can't attach PCI device to VM in pvh mode")
			}
		}
		if err != nil {
			return nil, err
		}
		at := hostdev.Attachment{Port: info.Port, Frontend: c.Dest.Name, Options: opts}
		var hverr error
		if err := s.changeFront(ctx, info.Port, c.Dest.Name, func() error {
			hverr = s.hv.Attach(ctx, at)
			return hverr
		}); err != nil {
			if errors.Is(hverr, hostdev.ErrAttached) {
				return nil, qerr.DeviceAlreadyAttached(fmt.Sprintf("Device %s already attached to %s", info, info.Attachment))
			}
			if hverr != nil {
				return nil, fmt.Errorf("%w: attach: %w", qerr.ErrAbort, hverr)
			}
			return nil, fmt.Errorf("%w: %w", qerr.ErrAbort, err)
		}
		return nil, s.publish(ctx, deviceEvent(c.Dest.Name, "device-attach:"+class, info.String(), opts))
	}
}

// pyBool is qubesd's property bool parser of option text.
func pyBool(v string) (bool, error) {
	switch strings.ToLower(v) {
	case "0", "no", "false", "off":
		return false, nil
	case "1", "yes", "true", "on":
		return true, nil
	}
	return false, qerr.ValueError("Invalid literal for boolean property: " + qerr.Repr(v))
}

// availableFrontends is qubesd's Storage.AVAILABLE_FRONTENDS order: xvdi…xvdz,
// xvdaa…xvdzz, then xvda…xvdh.
var availableFrontends = func() []string {
	var out []string
	for c := 'i'; c <= 'z'; c++ {
		out = append(out, "xvd"+string(c))
	}
	for c := 'a'; c <= 'z'; c++ {
		for d := 'a'; d <= 'z'; d++ {
			out = append(out, "xvd"+string(c)+string(d))
		}
	}
	for c := 'a'; c <= 'h'; c++ {
		out = append(out, "xvd"+string(c))
	}
	return out
}()

// blockOptions checks and completes the options of a block attachment as qubesd's
// block extension does before it attaches.
func blockOptions(inv hostdev.Inventory, info device.Info, vm string, opts []device.KV) ([]device.KV, error) {
	for i, o := range opts {
		switch o.Key {
		case "frontend-dev":
			if !strings.HasPrefix(o.Value, "xvd") && !strings.HasPrefix(o.Value, "sd") {
				return nil, qerr.ValueError("Invalid frontend-dev option value: " + o.Value)
			}
		case "read-only":
			b, err := pyBool(o.Value)
			if err != nil {
				return nil, err
			}
			opts[i].Value = map[bool]string{true: "yes", false: "no"}[b]
		case "devtype":
			if o.Value != "disk" && o.Value != "cdrom" {
				return nil, qerr.ValueError("devtype option can only have 'disk' or 'cdrom' value")
			}
		default:
			return nil, qerr.ValueError("Unsupported option " + o.Key)
		}
	}
	mode := info.Mode
	if mode == "" {
		mode = "w"
	}
	if _, ok := device.Option(opts, "read-only"); !ok {
		opts = device.SetOption(opts, "read-only", map[bool]string{true: "yes", false: "no"}[mode == "r"])
	}
	if ro, _ := device.Option(opts, "read-only"); ro == "no" && mode == "r" {
		return nil, qerr.ValueError("This device can be attached only read-only")
	}
	if info.Attachment != "" {
		return nil, qerr.DeviceAlreadyAttached(fmt.Sprintf("Device %s already attached to %s", info, info.Attachment))
	}
	if _, ok := device.Option(opts, "frontend-dev"); !ok {
		used := map[string]bool{}
		for _, at := range inv.Attached {
			if at.Frontend == vm {
				if v, ok := device.Option(at.Options, "frontend-dev"); ok {
					used[v] = true
				}
			}
		}
		devtype, _ := device.Option(opts, "devtype")
		fe := ""
		if devtype == "cdrom" && !used["xvdd"] {
			fe = "xvdd"
		} else {
			for _, f := range availableFrontends {
				if !used[f] {
					fe = f
					break
				}
			}
		}
		opts = device.SetOption(opts, "frontend-dev", fe)
	}
	return opts, nil
}

func (s *Service) detach(class string) rpc.Handler {
	return func(ctx context.Context, c *rpc.Call) ([]byte, error) {
		dev, err := s.target(c.Arg, class)
		if err != nil {
			return nil, err
		}
		s.wmu.Lock()
		defer s.wmu.Unlock()
		halted, m, err := s.halted(ctx, c.Dest.Name)
		if err != nil {
			return nil, err
		}
		var as []device.Assignment
		if d := m.Domain(c.Dest.Name); d != nil {
			as = device.Assigned(d, class)
		}
		inv, err := s.inventory(ctx)
		if err != nil {
			return nil, err
		}
		var found *device.Assignment
		for _, x := range attachedTo(inv, as, c.Dest.Name, class) {
			if x.Port.ID == dev.Port.ID {
				found = &x
				break
			}
		}
		if found == nil {
			return nil, qerr.DeviceNotAssigned(fmt.Sprintf("%s device %s not attached to %s", class, dev.Port.ID, c.Dest.Name))
		}
		for _, x := range as {
			if x.Mode == device.ModeRequired && !halted && x.Port == found.Port && (x.DeviceID == device.Any || x.DeviceID == found.DeviceID) {
				return nil, qerr.VMNotHaltedError("Can not detach a required device from a non halted qube. You need to unassign device first.")
			}
		}
		port := found.Port.String()
		if err := s.publish(ctx, cloudevent.New(c.Dest.Name, "device-pre-detach:"+class, "port", port)); err != nil {
			return nil, err
		}
		if err := s.changeFront(ctx, found.Port, "", func() error {
			if err := s.hv.Detach(ctx, hostdev.Attachment{Port: found.Port, Frontend: c.Dest.Name}); err != nil && !errors.Is(err, hostdev.ErrNotAttached) {
				return fmt.Errorf("detach: %w", err)
			}
			return nil
		}); err != nil {
			return nil, fmt.Errorf("%w: %w", qerr.ErrAbort, err)
		}
		return nil, s.publish(ctx, cloudevent.New(c.Dest.Name, "device-detach:"+class, "port", port))
	}
}
