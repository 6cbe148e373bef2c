package devices

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sort"
	"sync"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus/cloudevent"
	"github.com/qubesbus/qubesbus/schemas/device"
	"github.com/qubesbus/qubesbus/schemas/hostdev"
	"github.com/qubesbus/qubesbus/schemas/model"
)

// The device watch: qubesd's block extension keeps, per backend qube, the devices it
// last saw and where each was attached (devices_cache), and compares it with the
// backend's QubesDB when that changes. Here the same cache is compared with the
// hypervisor's device list when
//
//   - a qube starts (domain-start on the events stream): as a frontend its
//     auto-attach assignments are attached (on_domain_start); as a backend its
//     devices appear (the QubesDB watch fires once its agent writes them):
//     device-list-change, device-added, then auto-attach to running frontends;
//   - a qube stops (domain-shutdown): as a backend, device-removed for each device it
//     exposed, and device-detach on the frontend of an attached one; as a frontend,
//     device-detach for each device that was attached to it;
//   - the hypervisor announces a hot-plug or unplug (hostdev.Change): the backend's
//     devices are compared again, as on a QubesDB change.
//
// Only block devices are watched, as in qubesd: its PCI extension watches nothing
// (PCI devices are dom0's, which never stops, and a PCI hot-plug fires no event).
//
// The cache lives in this instance; every instance watches, so run one devices
// instance per host (as `qubesbus run` does) or its events are fired once per instance.
const watchedClass = "block"

// watch is the device cache and what drives it.
type watch struct {
	mu sync.Mutex
	// cache is backend → port id → frontend ("" when not attached).
	cache map[string]map[string]string
}

func newWatch() *watch { return &watch{cache: map[string]map[string]string{}} }

// setFront records where a block device is attached now (Attach and Detach call it,
// as qubesd's pre-attach and pre-detach handlers update the cache).
func (w *watch) setFront(p device.Port, front string) {
	if p.Class != watchedClass {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if ports := w.cache[p.Backend]; ports != nil {
		if _, ok := ports[p.ID]; ok {
			ports[p.ID] = front
		}
	}
}

// current is what a backend exposes now: port id → frontend.
func current(inv hostdev.Inventory, backend string) map[string]string {
	out := map[string]string{}
	for _, d := range inv.Devices {
		if d.Class == watchedClass && d.Backend == backend {
			out[d.Port.ID] = d.Attachment
		}
	}
	return out
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// startWatch fills the cache from the hypervisor and follows the events and the
// hypervisor's device changes until ctx ends. Events are handled one at a time, in
// the order they arrive.
func (s *Service) startWatch(ctx context.Context, nc *nats.Conn, js jetstream.JetStream) error {
	inv, err := s.hv.Devices(ctx)
	if err != nil {
		return fmt.Errorf("host devices: %w", err)
	}
	s.watch.mu.Lock()
	for _, d := range inv.Devices {
		if d.Class != watchedClass {
			continue
		}
		if s.watch.cache[d.Backend] == nil {
			s.watch.cache[d.Backend] = map[string]string{}
		}
		s.watch.cache[d.Backend][d.Port.ID] = d.Attachment
	}
	s.watch.mu.Unlock()

	type trigger struct {
		kind string // "domain-start", "domain-shutdown", "change"
		vm   string
	}
	queue := make(chan trigger, 1024)
	push := func(t trigger) {
		select {
		case queue <- t:
		case <-ctx.Done():
		}
	}
	sub, err := nc.Subscribe(s.cfg.Host.HypervisorDevices(), func(m *nats.Msg) {
		var ch hostdev.Change
		if json.Unmarshal(m.Data, &ch) == nil && ch.Backend != "" {
			push(trigger{"change", ch.Backend})
		}
	})
	if err != nil {
		return fmt.Errorf("subscribe to device changes: %w", err)
	}
	cons, err := js.OrderedConsumer(ctx, cloudevent.StreamName, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{s.cfg.Host.EventOfEveryVM("domain-start"), s.cfg.Host.EventOfEveryVM("domain-shutdown")},
		DeliverPolicy:  jetstream.DeliverNewPolicy,
	})
	if err != nil {
		_ = sub.Unsubscribe()
		return fmt.Errorf("follow power events: %w", err)
	}
	cc, err := cons.Consume(func(m jetstream.Msg) {
		ev, err := cloudevent.DecodeHeaders(&nats.Msg{Subject: m.Subject(), Header: m.Headers(), Data: m.Data()})
		if err != nil {
			ev, _, err = cloudevent.Decode(ctx, &nats.Msg{Subject: m.Subject(), Header: m.Headers(), Data: m.Data()})
		}
		if err == nil && ev.VM != "" {
			push(trigger{ev.Name, ev.VM})
		}
	})
	if err != nil {
		_ = sub.Unsubscribe()
		return fmt.Errorf("follow power events: %w", err)
	}
	if err := nc.Flush(); err != nil {
		s.log.Warn("flush device watch", "err", err)
	}
	go func() {
		defer cc.Stop()
		defer func() { _ = sub.Unsubscribe() }()
		for {
			select {
			case <-ctx.Done():
				return
			case t := <-queue:
				hctx, cancel := context.WithTimeout(ctx, s.cfg.WriteTimeout)
				var err error
				switch t.kind {
				case "domain-start":
					err = s.onStart(hctx, t.vm)
				case "domain-shutdown":
					err = s.onShutdown(hctx, t.vm)
				case "change":
					err = s.rescan(hctx, t.vm, true)
				}
				cancel()
				if err != nil {
					s.log.Warn("device watch", "event", t.kind, "vm", t.vm, "err", err)
				}
			}
		}
	}()
	return nil
}

// onStart handles a qube's domain-start: its auto-attach assignments, then its own
// devices as a backend, then its firewall rules in its netvm's table and, if it
// provides network, its own table with the rules of its running clients.
func (s *Service) onStart(ctx context.Context, vm string) error {
	errs := []error{s.autoAttachFrontend(ctx, vm), s.rescan(ctx, vm, true), s.publishFirewallOf(ctx, vm),
		s.reloadNetvmTable(ctx, vm)}
	return errors.Join(errs...)
}

// onShutdown handles a qube's domain-shutdown (block extension's on_domain_shutdown).
func (s *Service) onShutdown(ctx context.Context, vm string) error {
	s.watch.mu.Lock()
	mine := s.watch.cache[vm]
	s.watch.cache[vm] = map[string]string{}
	var evs []cloudevent.Event
	for _, port := range sortedKeys(mine) {
		p := device.Port{Backend: vm, ID: port, Class: watchedClass}.String()
		evs = append(evs, cloudevent.New(vm, "device-removed:"+watchedClass, "port", p))
		if front := mine[port]; front != "" {
			evs = append(evs, cloudevent.New(front, "device-detach:"+watchedClass, "port", p))
		}
	}
	// Devices attached to the stopped qube as a frontend (the backend keeps them).
	backends := make([]string, 0, len(s.watch.cache))
	for b := range s.watch.cache {
		backends = append(backends, b)
	}
	sort.Strings(backends)
	for _, b := range backends {
		if b == vm {
			continue
		}
		ports := s.watch.cache[b]
		for _, port := range sortedKeys(ports) {
			if ports[port] == vm {
				ports[port] = ""
				evs = append(evs, cloudevent.New(vm, "device-detach:"+watchedClass, "port", device.Port{Backend: b, ID: port}.String()))
			}
		}
	}
	s.watch.mu.Unlock()
	return s.publish(ctx, evs...)
}

// rescan compares a backend's devices with the cache (qubesd's device_list_change):
// detached by themselves, removed, added, attached by themselves; then the added
// devices are attached to the running qubes whose assignments match them.
func (s *Service) rescan(ctx context.Context, backend string, listChange bool) error {
	inv, err := s.inventory(ctx)
	if err != nil {
		return err
	}
	cur := current(inv, backend)
	s.watch.mu.Lock()
	old := s.watch.cache[backend]
	if old == nil {
		old = map[string]string{}
	}
	var added []string
	var detached, removed, attached []cloudevent.Event
	for _, port := range sortedKeys(cur) {
		p := device.Port{Backend: backend, ID: port, Class: watchedClass}
		front, seen := old[port]
		switch {
		case !seen:
			added = append(added, port)
			if cur[port] != "" {
				attached = append(attached, cloudevent.New(cur[port], "device-attach:"+watchedClass, "device", infoOf(inv, p).String(), "options", "{}"))
			}
		case front != cur[port]:
			if front != "" {
				detached = append(detached, cloudevent.New(front, "device-detach:"+watchedClass, "port", p.String()))
			}
			if cur[port] != "" {
				attached = append(attached, cloudevent.New(cur[port], "device-attach:"+watchedClass, "device", infoOf(inv, p).String(), "options", "{}"))
			}
		}
	}
	for _, port := range sortedKeys(old) {
		if _, ok := cur[port]; !ok {
			p := device.Port{Backend: backend, ID: port, Class: watchedClass}
			if front := old[port]; front != "" {
				detached = append(detached, cloudevent.New(front, "device-detach:"+watchedClass, "port", p.String()))
			}
			removed = append(removed, cloudevent.New(backend, "device-removed:"+watchedClass, "port", p.String()))
		}
	}
	s.watch.cache[backend] = cur
	s.watch.mu.Unlock()
	if len(added)+len(detached)+len(removed)+len(attached) == 0 {
		return nil
	}
	var evs []cloudevent.Event
	if listChange {
		evs = append(evs, cloudevent.New(backend, "device-list-change:"+watchedClass))
	}
	evs = append(evs, detached...)
	evs = append(evs, removed...)
	for _, port := range added {
		evs = append(evs, cloudevent.New(backend, "device-added:"+watchedClass, "device", infoOf(inv, device.Port{Backend: backend, ID: port, Class: watchedClass}).String()))
	}
	evs = append(evs, attached...)
	if err := s.publish(ctx, evs...); err != nil {
		return err
	}
	return s.autoAttachAdded(ctx, backend, added)
}

func infoOf(inv hostdev.Inventory, p device.Port) device.Info {
	if d, ok := inv.Find(p.Class, p.Backend, p.ID); ok {
		return d
	}
	return device.Info{Port: p}
}

// matches is qubesd's DeviceAssignment.matches: same class and backend, the port
// and the identity each equal or any.
func matches(a device.Assignment, d device.Info) bool {
	return a.Port.Class == d.Class && a.Backend == d.Backend &&
		(a.Port.ID == device.Any || a.Port.ID == d.Port.ID) &&
		(a.DeviceID == device.Any || a.DeviceID == d.Identity())
}

// specificity orders assignments as qubesd's reversed(sorted(...)) does for the
// choice among several matching one device: a named port before any port, a named
// identity before any.
func specificity(a device.Assignment) int {
	n := 0
	if a.Port.ID != device.Any {
		n += 2
	}
	if a.DeviceID != device.Any {
		n++
	}
	return n
}

// autoAttachFrontend attaches to a qube that just started the available block
// devices its non-required assignments match (block extension's on_domain_start).
// ask-to-attach needs a user's answer that nobody gives here: such devices stay.
func (s *Service) autoAttachFrontend(ctx context.Context, vm string) error {
	as, err := s.assignedOf(vm, watchedClass)
	if err != nil {
		return nil // removed meanwhile
	}
	as = slices.DeleteFunc(as, func(a device.Assignment) bool { return a.Mode != device.ModeAuto })
	if len(as) == 0 {
		return nil
	}
	slices.SortStableFunc(as, func(a, b device.Assignment) int { return specificity(b) - specificity(a) })
	inv, err := s.inventory(ctx)
	if err != nil {
		return err
	}
	done := map[device.Port]bool{}
	var errs []error
	for _, a := range as {
		for _, d := range inv.Devices {
			if d.Attachment != "" || done[d.Port] || !matches(a, d) {
				continue
			}
			done[d.Port] = true
			errs = append(errs, s.attachAssigned(ctx, inv, vm, a, d, true))
		}
	}
	return errors.Join(errs...)
}

// autoAttachAdded attaches devices that just appeared at a backend to the running
// qubes whose assignments match them (qubesd's device_list_change, then
// resolve_conflicts_and_attach). A device that several qubes want is attached to
// none: qubesd asks the user which, and nobody answers here.
func (s *Service) autoAttachAdded(ctx context.Context, backend string, added []string) error {
	if len(added) == 0 {
		return nil
	}
	rt, err := s.runtime(ctx)
	if err != nil {
		return err
	}
	type want struct {
		vm string
		a  device.Assignment
	}
	wants := map[string][]want{} // port id → frontends
	_ = s.view(rt, func(m *model.Model) error {
		for i := range m.C.Domains {
			d := &m.C.Domains[i]
			name := d.Name()
			if name == backend || d.Class == "RemoteVM" || len(d.Devices) == 0 || m.PowerState(name) != "Running" {
				continue
			}
			best := map[string]device.Assignment{}
			for _, a := range device.Assigned(d, watchedClass) {
				if a.Backend != backend || a.Mode == device.ModeAsk {
					continue
				}
				for _, port := range added {
					if a.Port.ID != device.Any && a.Port.ID != port {
						continue
					}
					if cur, ok := best[port]; !ok || specificity(a) > specificity(cur) {
						best[port] = a
					}
				}
			}
			for port, a := range best {
				wants[port] = append(wants[port], want{name, a})
			}
		}
		return nil
	})
	if len(wants) == 0 {
		return nil
	}
	inv, err := s.inventory(ctx)
	if err != nil {
		return err
	}
	var errs []error
	for _, port := range added {
		w := wants[port]
		if len(w) != 1 {
			continue
		}
		d, ok := inv.Find(watchedClass, backend, port)
		if !ok || d.Attachment != "" || !matches(w[0].a, d) {
			continue
		}
		errs = append(errs, s.attachAssigned(ctx, inv, w[0].vm, w[0].a, d, true))
	}
	return errors.Join(errs...)
}

// attachAssigned attaches a device to vm for an assignment, as qubesd's
// attach_and_notify: the options completed as a manual attach would, no
// device-pre-attach event, device-attach when notify.
func (s *Service) attachAssigned(ctx context.Context, inv hostdev.Inventory, vm string, a device.Assignment, d device.Info, notify bool) error {
	opts := slices.Clone(a.Options)
	if d.Class == "block" {
		var err error
		if opts, err = blockOptions(inv, d, vm, opts); err != nil {
			return fmt.Errorf("attach %s to %s: %w", d, vm, err)
		}
	}
	if err := s.hv.Attach(ctx, hostdev.Attachment{Port: d.Port, Frontend: vm, Options: opts}); err != nil {
		return fmt.Errorf("attach %s to %s: %w", d, vm, err)
	}
	s.watch.setFront(d.Port, vm)
	if !notify {
		return nil
	}
	return s.publish(ctx, deviceEvent(vm, "device-attach:"+d.Class, d.String(), opts))
}
