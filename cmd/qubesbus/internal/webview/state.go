// Package webview is the read-only web page at / of the --http listener: every host on
// the bus with its qubes (class, power state, label colour, netvm) and a live event
// feed, served from assets embedded in the binary.
//
// Everything comes from the bus as the webview role (cmd/qubesbus/internal/access), which can read but
// change nothing: the hosts are the subjects of the configuration history
// (QUBES_CONFIG), each host's qubes a replica of its configuration (a snapshot from
// persistence, then the history), power states the vmlifecycle service's answer
// once, then the power events of the events stream (QUBES_EVENTS).
package webview

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"regexp"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/cloudevent"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/schemas/changelog"
	"github.com/qubesbus/qubesbus/schemas/config"
	"github.com/qubesbus/qubesbus/schemas/configstore"
	"github.com/qubesbus/qubesbus/schemas/lifecycle"
	"github.com/qubesbus/qubesbus/schemas/model"
	"github.com/qubesbus/qubesbus/schemas/replica"
)

// discoverEvery is how often the view looks for hosts that appeared on the bus.
const discoverEvery = 5 * time.Second

// Qube is one row of a host's table.
type Qube struct {
	Name  string `json:"name"`
	Class string `json:"class"`
	State string `json:"state"`
	Label string `json:"label"`
	Color string `json:"color,omitempty"` // "#rrggbb", or empty when the label has none
	NetVM string `json:"netvm"`
}

// Host is what the page shows of one host.
type Host struct {
	ID       string `json:"id"`
	Revision uint64 `json:"revision"`
	Error    string `json:"error,omitempty"` // why the host's qubes are not (yet) known
	Qubes    []Qube `json:"qubes"`
}

// View follows every host on the bus.
type View struct {
	ctx context.Context
	nc  *nats.Conn
	js  jetstream.JetStream
	log *slog.Logger

	mu    sync.Mutex
	hosts map[string]*hostView
	// changed is closed and replaced whenever any host changes (a broadcast).
	changed chan struct{}
}

// Start follows the hosts on nc (a connection as the webview role) until ctx ends.
func Start(ctx context.Context, nc *nats.Conn, log *slog.Logger) (*View, error) {
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, fmt.Errorf("webview: jetstream: %w", err)
	}
	v := &View{ctx: ctx, nc: nc, js: js, log: log, hosts: map[string]*hostView{}, changed: make(chan struct{})}
	// Power events first: a host's states asked for after this are never older
	// than the events it receives (hostView.loadPower).
	if err := v.followPower(ctx); err != nil {
		return nil, err
	}
	if err := v.discover(ctx); err != nil {
		log.Warn("webview: looking for hosts", "err", err)
	}
	go func() {
		t := time.NewTicker(discoverEvery)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				if err := v.discover(ctx); err != nil && ctx.Err() == nil {
					log.Debug("webview: looking for hosts", "err", err)
				}
			}
		}
	}()
	return v, nil
}

// discover adds a follower for every host with a configuration history.
func (v *View) discover(ctx context.Context) error {
	s, err := v.js.Stream(ctx, changelog.StreamName)
	if err != nil {
		return fmt.Errorf("config stream: %w", err)
	}
	info, err := s.Info(ctx, jetstream.WithSubjectFilter(subject.AllConfig()))
	if err != nil {
		return fmt.Errorf("config stream info: %w", err)
	}
	for subj := range info.State.Subjects {
		tok := strings.TrimSuffix(strings.TrimPrefix(subj, subject.Prefix+"."), ".config")
		id, err := subject.UnescapeToken(tok)
		if err != nil {
			continue // a hashed host id: it cannot be asked for by name
		}
		v.addHost(id)
	}
	return nil
}

func (v *View) addHost(id string) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if _, ok := v.hosts[id]; ok {
		return
	}
	h := &hostView{v: v, id: id, host: subject.ForHost(id), power: map[string]string{}, err: "loading"}
	v.hosts[id] = h
	go h.run()
	v.notifyLocked()
}

// notify wakes everyone waiting for a change (Changed).
func (v *View) notify() {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.notifyLocked()
}

func (v *View) notifyLocked() {
	close(v.changed)
	v.changed = make(chan struct{})
}

// Changed is closed at the next change of any host.
func (v *View) Changed() <-chan struct{} {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.changed
}

// Hosts is every known host, by id, with its version (which grows on each change).
func (v *View) Hosts() []HostVersion {
	v.mu.Lock()
	hs := make([]*hostView, 0, len(v.hosts))
	for _, h := range v.hosts {
		hs = append(hs, h)
	}
	v.mu.Unlock()
	out := make([]HostVersion, len(hs))
	for i, h := range hs {
		out[i] = HostVersion{ID: h.id, Version: h.currentVersion()}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// HostVersion names a host at a version.
type HostVersion struct {
	ID      string
	Version uint64
}

// HostJSON is a host's table as JSON, and the version it reflects.
func (v *View) HostJSON(id string) ([]byte, uint64, bool) {
	v.mu.Lock()
	h := v.hosts[id]
	v.mu.Unlock()
	if h == nil {
		return nil, 0, false
	}
	b, ver := h.json()
	return b, ver, true
}

// followPower applies every power event of every host, in stream order, from now on.
func (v *View) followPower(ctx context.Context) error {
	var filters []string
	for name := range powerOf {
		filters = append(filters, subject.Prefix+".*.events.*."+subject.Token(name))
	}
	sort.Strings(filters)
	cons, err := v.js.OrderedConsumer(ctx, cloudevent.StreamName, jetstream.OrderedConsumerConfig{
		FilterSubjects: filters, DeliverPolicy: jetstream.DeliverNewPolicy})
	if err != nil {
		return fmt.Errorf("webview: power events consumer: %w", err)
	}
	cc, err := cons.Consume(func(msg jetstream.Msg) {
		ev, ce, err := cloudevent.Decode(ctx, &nats.Msg{Subject: msg.Subject(), Header: msg.Headers(), Data: msg.Data()})
		if err != nil {
			v.log.Debug("webview: skipping undecodable event", "subject", msg.Subject(), "err", err)
			return
		}
		v.mu.Lock()
		h := v.hosts[cloudevent.HostOf(ce)]
		v.mu.Unlock()
		if h != nil {
			h.onPower(ev)
		}
	})
	if err != nil {
		return fmt.Errorf("webview: power events: %w", err)
	}
	context.AfterFunc(ctx, cc.Stop)
	return nil
}

// powerOf is the power state each event leaves its qube in (docs/spec/events.md §5).
var powerOf = map[string]lifecycle.PowerState{
	"domain-pre-start":       lifecycle.Transient,
	"domain-start-failed":    lifecycle.Halted,
	"domain-start":           lifecycle.Running,
	"domain-pre-shutdown":    lifecycle.Halting,
	"domain-shutdown-failed": lifecycle.Running,
	"domain-shutdown":        lifecycle.Halted,
	"domain-paused":          lifecycle.Paused,
	"domain-unpaused":        lifecycle.Running,
	"domain-resumed":         lifecycle.Running,
}

// hostView follows one host.
type hostView struct {
	v    *View
	id   string
	host subject.Host

	mu  sync.Mutex
	rep *replica.Replica // nil until the first snapshot
	// power holds the qubes that are not Halted; until the first answer of the
	// lifecycle service (powerLoaded) events queue in pending.
	power       map[string]string
	powerLoaded bool
	pending     []cloudevent.Event
	err         string
	version     uint64
	cache       []byte // json of version cacheVer
	cacheVer    uint64
}

func (h *hostView) changed() {
	h.mu.Lock()
	h.version++
	h.mu.Unlock()
	h.v.notify()
}

func (h *hostView) setErr(msg string) {
	h.mu.Lock()
	h.err = msg
	h.mu.Unlock()
	h.changed()
}

// run loads the host's configuration and power states, trying again (1 s … 10 s
// apart) while the host does not answer: a host of an earlier run whose history is
// still in the stream stays listed as unreachable.
func (h *hostView) run() {
	ctx := h.v.ctx
	back := bus.Backoff{Next: time.Second, Max: 10 * time.Second}
	for ctx.Err() == nil {
		err := h.follow(ctx)
		if err == nil {
			break
		}
		h.v.log.Debug("webview: host", "host", h.id, "err", err)
		h.setErr("unreachable: " + err.Error())
		if back.Wait(ctx) != nil {
			return
		}
	}
	for ctx.Err() == nil {
		err := h.loadPower(ctx)
		if err == nil {
			return
		}
		h.v.log.Debug("webview: power states", "host", h.id, "err", err)
		h.setErr("power states unknown: " + err.Error())
		if back.Wait(ctx) != nil {
			return
		}
	}
}

// follow fetches a snapshot of the configuration and follows its history from there.
func (h *hostView) follow(ctx context.Context) error {
	snap, err := h.snapshot(ctx)
	if err != nil {
		return err
	}
	clog, err := changelog.Attach(ctx, h.v.js, h.host)
	if err != nil {
		return err
	}
	rep := replica.New(snap.Config, snap.Revision)
	h.mu.Lock()
	h.rep = rep
	h.mu.Unlock()
	seq := snap.Sequence
	_, err = clog.Tail(ctx, snap.Sequence+1, func(rec changelog.Record, err error) {
		if err != nil {
			h.v.log.Warn("webview: config history", "host", h.id, "err", err)
			return
		}
		if rec.Sequence <= seq {
			return
		}
		seq = rec.Sequence
		switch {
		case rec.Base != nil:
			if rec.Revision > rep.Revision() {
				rep.Reset(rec.Base, rec.Revision)
			}
		default:
			if err := rep.Apply(rec.Revision, rec.Change.Ops); err != nil {
				// A gap (a compaction we were behind): start over from a snapshot.
				h.v.log.Warn("webview: config history; resynchronising", "host", h.id, "err", err)
				if snap, err := h.snapshot(ctx); err == nil && snap.Revision > rep.Revision() {
					rep.Reset(snap.Config, snap.Revision)
					seq = max(seq, snap.Sequence)
				}
			}
		}
		h.changed()
	})
	if err != nil {
		return err
	}
	h.changed()
	return nil
}

func (h *hostView) snapshot(ctx context.Context) (configstore.Snapshot, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return configstore.FetchSnapshot(ctx, h.v.nc, h.host)
}

// loadPower asks the lifecycle service for the power states, then applies the events
// that came meanwhile: the power consumer started before, so they are at least as
// new as the answer, and each sets a state outright.
func (h *hostView) loadPower(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	states, err := lifecycle.Client{NC: h.v.nc, Host: h.host}.PowerStates(ctx)
	if err != nil {
		return err
	}
	h.mu.Lock()
	h.power = states
	for _, ev := range h.pending {
		h.applyLocked(ev)
	}
	h.pending, h.powerLoaded, h.err = nil, true, ""
	h.mu.Unlock()
	h.changed()
	return nil
}

func (h *hostView) onPower(ev cloudevent.Event) {
	h.mu.Lock()
	if !h.powerLoaded {
		h.pending = append(h.pending, ev)
		h.mu.Unlock()
		return
	}
	h.applyLocked(ev)
	h.mu.Unlock()
	h.changed()
}

func (h *hostView) applyLocked(ev cloudevent.Event) {
	st, ok := powerOf[ev.Name]
	if !ok || ev.VM == "" {
		return
	}
	if st == lifecycle.Halted {
		delete(h.power, ev.VM)
	} else {
		h.power[ev.VM] = string(st)
	}
}

func (h *hostView) currentVersion() uint64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.version
}

// json is the host's table at its current version, built once per version.
func (h *hostView) json() ([]byte, uint64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.cache != nil && h.cacheVer == h.version {
		return h.cache, h.version
	}
	out := Host{ID: h.id, Error: h.err, Qubes: []Qube{}}
	if h.rep != nil {
		out.Revision = h.rep.Revision()
		h.rep.View(func(c *config.Config) { out.Qubes = rows(c, h.power, h.powerLoaded) })
	}
	b, err := json.Marshal(out)
	if err != nil { // plain strings and numbers: cannot fail
		panic(err)
	}
	h.cache, h.cacheVer = b, h.version
	return b, h.version
}

var colorRe = regexp.MustCompile(`\A0x[0-9a-fA-F]{6}\z`)

// rows are a configuration's qubes, sorted by name, with their power states.
func rows(c *config.Config, power map[string]string, powerKnown bool) []Qube {
	colors := make(map[string]string, len(c.Labels))
	for _, l := range c.Labels {
		if colorRe.MatchString(l.Color) {
			colors[l.Name] = "#" + strings.ToLower(l.Color[2:])
		}
	}
	m := model.New(c, model.DefaultHost, nil)
	out := make([]Qube, 0, len(c.Domains))
	for i := range c.Domains {
		d := &c.Domains[i]
		q := Qube{Name: d.Name(), Class: d.Class, State: string(lifecycle.Halted)}
		if !powerKnown {
			q.State = "?"
		} else if st, ok := power[q.Name]; ok {
			q.State = st
		}
		if d.Class == "AdminVM" {
			q.State = string(lifecycle.Running) // dom0 always runs
		}
		hold := model.Holder{D: d}
		if r, err := m.Get(hold, "label"); err == nil {
			q.Label = r.Value.String()
			q.Color = colors[q.Label]
		}
		if model.HasProperty(d.Class, "netvm") {
			if r, err := m.Get(hold, "netvm"); err == nil {
				q.NetVM = r.Value.String()
			}
		}
		out = append(out, q)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}
