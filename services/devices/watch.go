package devices

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/cloudevent"
	"github.com/qubesbus/qubesbus/bus/rpc"
	"github.com/qubesbus/qubesbus/bus/subject"
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
// The cache is each backend's record in the DevicesBucket (record.go), shared by the
// host's devices instances, and each input reaches one of them: the power events
// through a durable consumer they share (one event at a time, in order), the
// hypervisor's device notices through a queue subscription. An instance changes a
// record by compare-and-set and publishes the events of a change only once its
// write succeeded; one that loses the race reads the record again and finds nothing
// left to announce. So every event is fired once, whichever instance handles it.
// Limits: an instance killed between its write and its publish loses that change's
// events (at most once, never twice). The records outlive the instances and the
// host; a record of an earlier boot of the hypervisor counts as none (record.go).
const watchedClass = "block"

// PowerConsumer is the durable consumer of a host's devices instances.
func PowerConsumer(h subject.Host) string { return string(rpc.Devices) + "-power-" + h.ID() }

// watchQueue is the queue group of the devices instances' hot-plug subscription.
var watchQueue = rpc.Devices.Micro() + "-watch"

// powerAckWait is how long a power event handled by an instance that died stays
// with it before another instance gets it.
const powerAckWait = 30 * time.Second

// setFront records where a block device is attached now (Attach and Detach call it,
// as qubesd's pre-attach and pre-detach handlers update the cache).
func (s *Service) setFront(ctx context.Context, p device.Port, front string) error {
	if p.Class != watchedClass {
		return nil
	}
	return s.records.modify(ctx, p.Backend, func(ports map[string]string) map[string]string {
		if _, ok := ports[p.ID]; !ok {
			return nil
		}
		ports[p.ID] = front
		return ports
	})
}

// pendingFor is how long a port stays marked as being attached or detached by an
// instance (changeFront): longer than an attach takes, so a rescan does not announce
// it; a mark left by an instance that died meanwhile stops counting after it.
const pendingFor = time.Minute

// A record's value for a port whose attachment an instance is changing: the frontend
// before the change, then the time of the mark. The hypervisor shows the new state
// before the record does, and a rescan by another instance in between must announce
// neither the change (the instance changing it does, with its options) nor a revert.
const pendingSep = "\x00pending\x00"

func pendingValue(prev string, now time.Time) string {
	return prev + pendingSep + strconv.FormatInt(now.UnixNano(), 10)
}

// frontOf is the frontend a record's value stands for (a mark: the one before the
// change), and whether the value is a mark that still holds.
func frontOf(v string, now time.Time) (front string, pending bool) {
	prev, ts, ok := strings.Cut(v, pendingSep)
	if !ok {
		return v, false
	}
	n, err := strconv.ParseInt(ts, 10, 64)
	return prev, err == nil && now.Sub(time.Unix(0, n)) < pendingFor
}

// changeFront attaches or detaches a block device (do) with the port marked in its
// backend's record meanwhile, then records the frontend it has after: to, or the one
// before if do fails.
func (s *Service) changeFront(ctx context.Context, p device.Port, to string, do func() error) error {
	if p.Class != watchedClass {
		return do()
	}
	var prev string
	if err := s.records.modify(ctx, p.Backend, func(ports map[string]string) map[string]string {
		v, ok := ports[p.ID]
		if !ok {
			return nil
		}
		prev, _ = frontOf(v, time.Now())
		ports[p.ID] = pendingValue(prev, time.Now())
		return ports
	}); err != nil {
		return err
	}
	if err := do(); err != nil {
		if rerr := s.setFront(context.WithoutCancel(ctx), p, prev); rerr != nil {
			s.log.Warn("clear a device's pending mark", "port", p.String(), "err", rerr)
		}
		return err
	}
	return s.setFront(ctx, p, to)
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

// trigger is one input of the watch.
type trigger struct {
	kind string // "domain-start", "domain-shutdown", "change"
	vm   string
	msg  jetstream.Msg // the power event, acknowledged once handled (nil: a notice)
}

// startWatch records the backends the hypervisor shows that have no record of this
// boot yet (qubesd's cache as it loads: no events) and
// follows the power events and the hypervisor's device changes until ctx ends. An
// instance handles its inputs one at a time, in the order they arrive.
func (s *Service) startWatch(ctx context.Context, nc *nats.Conn, js jetstream.JetStream) error {
	inv, err := s.inventory(ctx)
	if err != nil {
		return err
	}
	seen := map[string]bool{}
	for _, d := range inv.Devices {
		if d.Class == watchedClass && !seen[d.Backend] {
			seen[d.Backend] = true
			if err := s.records.create(ctx, d.Backend, current(inv, d.Backend)); err != nil {
				return err
			}
		}
	}

	queue := make(chan trigger, 1024)
	stopped := make(chan struct{}) // closed when the loop below takes no more inputs
	push := func(t trigger) bool {
		select {
		case <-stopped:
			return false
		default:
		}
		select {
		case queue <- t:
			return true
		case <-stopped:
			return false
		}
	}
	sub, err := nc.QueueSubscribe(s.cfg.Host.HypervisorDevices(), watchQueue, func(m *nats.Msg) {
		var ch hostdev.Change
		if json.Unmarshal(m.Data, &ch) == nil && ch.Backend != "" {
			push(trigger{kind: "change", vm: ch.Backend})
		}
	})
	if err != nil {
		return fmt.Errorf("subscribe to device changes: %w", err)
	}
	cfg := jetstream.ConsumerConfig{
		Durable:        PowerConsumer(s.cfg.Host),
		FilterSubjects: []string{s.cfg.Host.EventOfEveryVM("domain-start"), s.cfg.Host.EventOfEveryVM("domain-shutdown")},
		DeliverPolicy:  jetstream.DeliverNewPolicy,
		AckPolicy:      jetstream.AckExplicitPolicy,
		MaxAckPending:  1, // one at a time, in order, across the instances
		AckWait:        powerAckWait,
	}
	cons, err := bus.RetryJSFor(ctx, s.log, "consumer "+cfg.Durable, func(ctx context.Context) (jetstream.Consumer, error) {
		return js.CreateOrUpdateConsumer(ctx, cloudevent.StreamName, cfg)
	})
	if err != nil {
		_ = sub.Unsubscribe()
		return fmt.Errorf("follow power events: %w", err)
	}
	// A power event is acknowledged once handled; one this instance will not handle
	// (it is stopping) is given back at once, for another instance.
	cc, err := cons.Consume(func(m jetstream.Msg) {
		_, vm, name, ok := subject.ParseEvent(m.Subject())
		if !ok || vm == "" {
			_ = m.Ack()
		} else if !push(trigger{kind: name, vm: vm, msg: m}) {
			_ = m.Nak()
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
		defer close(s.watchStopped)
		// An input taken is handled to its end even when the instance stops meanwhile
		// (its record written, its events then published), while the services it
		// calls still answer: for drainWait after ctx ended. The hypervisor of the
		// same process stops with ctx, and a call to it would otherwise wait out the
		// whole WriteTimeout and hold up the process's stop.
		hctx, hcancel := context.WithCancel(context.WithoutCancel(ctx))
		defer hcancel()
		context.AfterFunc(ctx, func() { time.AfterFunc(drainWait, hcancel) })
		for {
			select {
			case <-ctx.Done():
				s.stopWatch(ctx, hctx, nc, stopped, sub, cc, queue)
				return
			case t := <-queue:
				s.handleLogged(hctx, t)
				if t.msg != nil {
					_ = t.msg.Ack()
				}
			}
		}
	}()
	return nil
}

// drainWait bounds how long a stopping instance waits for its power consumer to hand
// back the events it holds.
const drainWait = 5 * time.Second

// stopWatch takes no more inputs: the power events this instance received and did
// not handle are given back at once (else the one pending would wait out its ack
// wait before another instance gets it), the hot-plug notices it took are handled
// (nobody else saw them), and the acknowledgements are flushed before the caller
// closes the connection.
func (s *Service) stopWatch(ctx, hctx context.Context, nc *nats.Conn, stopped chan struct{}, sub *nats.Subscription, cc jetstream.ConsumeContext, queue chan trigger) {
	close(stopped)
	_ = sub.Unsubscribe()
	cc.Drain() // the buffered messages reach the callback, which gives them back
	// ctx has ended (the instance stops): the drain has a bound of its own.
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), drainWait)
	select {
	case <-cc.Closed():
	case <-dctx.Done():
		s.log.Warn("device watch: power events not drained")
	}
	cancel()
	for {
		select {
		case t := <-queue:
			if t.msg != nil {
				_ = t.msg.Nak()
			} else {
				s.handleLogged(hctx, t)
			}
			continue
		default:
		}
		break
	}
	if err := nc.Flush(); err != nil && !errors.Is(err, nats.ErrConnectionClosed) {
		s.log.Warn("device watch: flush acknowledgements", "err", err)
	}
}

// handleLogged handles an input and logs its failure.
func (s *Service) handleLogged(ctx context.Context, t trigger) {
	if err := s.handle(ctx, t); err != nil {
		s.log.Warn("device watch", "event", t.kind, "vm", t.vm, "err", err)
	}
	if s.afterTrigger != nil {
		s.afterTrigger(t.kind, t.vm)
	}
}

// handle runs one input of the watch.
func (s *Service) handle(ctx context.Context, t trigger) error {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.WriteTimeout)
	defer cancel()
	switch t.kind {
	case "domain-start":
		return s.onStart(ctx, t.vm)
	case "domain-shutdown":
		return s.onShutdown(ctx, t.vm)
	case "change":
		return s.rescan(ctx, t.vm, true)
	}
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

// onShutdown handles a qube's domain-shutdown (block extension's on_domain_shutdown):
// its own record is emptied, then it is taken off as the frontend of the devices of
// the other backends, one record at a time, each change's events published once it
// is written.
func (s *Service) onShutdown(ctx context.Context, vm string) error {
	var evs []cloudevent.Event
	err := s.records.modify(ctx, vm, func(mine map[string]string) map[string]string {
		evs = nil
		for _, port := range sortedKeys(mine) {
			p := device.Port{Backend: vm, ID: port, Class: watchedClass}.String()
			evs = append(evs, cloudevent.New(vm, "device-removed:"+watchedClass, "port", p))
			if front, _ := frontOf(mine[port], time.Now()); front != "" {
				evs = append(evs, cloudevent.New(front, "device-detach:"+watchedClass, "port", p))
			}
		}
		return map[string]string{}
	})
	if err != nil {
		return err
	}
	if err := s.publish(ctx, evs...); err != nil {
		return err
	}
	// Devices attached to the stopped qube as a frontend (the backend keeps them).
	backends, err := s.records.backends(ctx)
	if err != nil {
		return err
	}
	sort.Strings(backends)
	var errs []error
	for _, b := range backends {
		if b == vm {
			continue
		}
		evs = nil
		err := s.records.modify(ctx, b, func(ports map[string]string) map[string]string {
			evs = nil
			for _, port := range sortedKeys(ports) {
				if front, _ := frontOf(ports[port], time.Now()); front == vm {
					ports[port] = ""
					evs = append(evs, cloudevent.New(vm, "device-detach:"+watchedClass, "port", device.Port{Backend: b, ID: port}.String()))
				}
			}
			return ports
		})
		if err == nil {
			err = s.publish(ctx, evs...)
		}
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// rescan compares a backend's devices with its record (qubesd's device_list_change):
// detached by themselves, removed, added, attached by themselves; then the added
// devices are attached to the running qubes whose assignments match them. The record
// is read before the hypervisor, so what it is compared with is never older than the
// record; a write that loses to another instance's is computed again.
func (s *Service) rescan(ctx context.Context, backend string, listChange bool) error {
	var inv hostdev.Inventory
	var invErr error
	var added []string
	var detached, removed, attached []cloudevent.Event
	err := s.records.modify(ctx, backend, func(old map[string]string) map[string]string {
		added, detached, removed, attached = nil, nil, nil, nil
		if inv, invErr = s.inventory(ctx); invErr != nil {
			return nil // the record stays as it is
		}
		cur := current(inv, backend)
		now := time.Now()
		next := maps.Clone(cur)
		for _, port := range sortedKeys(cur) {
			p := device.Port{Backend: backend, ID: port, Class: watchedClass}
			v, seen := old[port]
			front, pending := frontOf(v, now)
			if pending { // an instance is changing it and announces the change
				next[port] = v
				continue
			}
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
				if front, _ := frontOf(old[port], now); front != "" {
					detached = append(detached, cloudevent.New(front, "device-detach:"+watchedClass, "port", p.String()))
				}
				removed = append(removed, cloudevent.New(backend, "device-removed:"+watchedClass, "port", p.String()))
			}
		}
		return next
	})
	if err != nil {
		return err
	}
	if invErr != nil {
		return invErr
	}
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
	if err := s.changeFront(ctx, d.Port, vm, func() error {
		return s.hv.Attach(ctx, hostdev.Attachment{Port: d.Port, Frontend: vm, Options: opts})
	}); err != nil {
		return fmt.Errorf("attach %s to %s: %w", d, vm, err)
	}
	if !notify {
		return nil
	}
	return s.publish(ctx, deviceEvent(vm, "device-attach:"+d.Class, d.String(), opts))
}
