package gateway

// The fast path of admin.Events: see hub.

import (
	"math"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus/cloudevent"
)

// fastPath is one subscription of the fast path; its callback relays only while it
// is the hub's.
type fastPath struct {
	sub *nats.Subscription
	// epoch counts what may have lost the path messages: the connection's reconnects
	// and the messages the subscription dropped. A message heard at an epoch follows
	// every loss counted in it.
	epoch func() uint64
	// received counts the messages the subscription has received (handled or
	// queued); handled, those relayAhead is done with, each followed by a tick.
	received func() uint64
	handled  atomic.Uint64
	tick     chan struct{}
}

// catchUpWait bounds how long the feed waits for the fast path to handle what it has
// received (it always makes progress: this only guards a subscription closed under it).
const catchUpWait = 100 * time.Millisecond

// catchUp returns once the fast path has handled every message it had received when
// catchUp was called. Both copies of an event come over the gateway's one connection,
// the published one first, but the feed and the fast path read them in two
// goroutines: without this, the feed would often take the lead and find an event the
// fast path has not heard yet, which reads as a loss.
func (p *fastPath) catchUp() {
	if p.received == nil {
		return
	}
	target := p.received()
	if p.handled.Load() >= target {
		return
	}
	timeout := time.NewTimer(catchUpWait)
	defer timeout.Stop()
	for p.handled.Load() < target {
		select {
		case <-p.tick:
		case <-timeout.C:
			return
		}
	}
}

// heldEvent is an event the fast path heard while it was not trusted.
type heldEvent struct {
	epoch uint64
	at    time.Time
}

// aheadEvent is an event the fast path relayed: to the subscribers that joined before
// it (subscriber.joined < n), at.
type aheadEvent struct {
	n  uint64
	at time.Time
}

// aheadTTL is how long the hub waits for the feed to bring an event the fast path
// relayed (a stream that refused it never does). Longer than a feed's resumeWindow
// and stall: an event older than that is not awaited, and if it still comes, it is
// relayed a second time rather than never.
const aheadTTL = 2*resumeWindow + stalled

// seqAhead is the sequence of an item of the fast path: not known yet, and past any
// subscriber's start (see Events.Serve).
const seqAhead = math.MaxUint64

// idRing remembers the last ids added, up to its size.
type idRing struct {
	ids  []string
	next int
	set  map[string]struct{}
}

// relayedMemory is how many of the feed's latest events a hub remembers: a fast copy
// comes at most a few events after the feed's, and a lab's thousand gateways with
// subscribers keep about 50 KB each.
const relayedMemory = 1024

func (r *idRing) add(id string) {
	if r.ids == nil {
		r.ids, r.set = make([]string, relayedMemory), make(map[string]struct{}, relayedMemory)
	}
	if old := r.ids[r.next]; old != "" {
		delete(r.set, old)
	}
	r.ids[r.next] = id
	r.set[id] = struct{}{}
	r.next = (r.next + 1) % len(r.ids)
}

func (r *idRing) has(id string) bool {
	_, ok := r.set[id]
	return ok
}

// startFast subscribes to the host's events as they are published. Without it (an
// error, or a permission the server refuses later) the feed relays everything, only
// later. The caller holds mu.
//
// Only on a server of its own: its order guard trusts the fast path while the
// connection neither reconnected nor dropped a message, which is all a lost message
// can be on one server. In a cluster, a message published on another node crosses a
// route, and a route that breaks (a node lost) loses messages with no sign on this
// connection: the fast path would relay a later event before the one it missed
// (TestEventsSurviveConsumerNodeLoss caught that). There the feed relays everything.
func (h *hub) startFast() {
	nc := h.e.nc
	if nc.ConnectedClusterName() != "" {
		return
	}
	path := &fastPath{tick: make(chan struct{}, 1)}
	sub, err := nc.Subscribe(h.e.host.Events(), func(msg *nats.Msg) { h.relayAhead(path, msg) })
	if err != nil {
		h.e.log.Warn("admin.Events fast path; relaying from the stream only", "err", err)
		return
	}
	_ = sub.SetPendingLimits(max(h.e.cfg.Buffer, feedPending), 64<<20)
	path.sub = sub
	path.epoch = func() uint64 {
		dropped, _ := sub.Dropped()
		return nc.Stats().Reconnects + uint64(max(dropped, 0))
	}
	path.received = func() uint64 {
		delivered, _ := sub.Delivered()
		pending, _, _ := sub.Pending()
		return uint64(max(delivered, 0)) + uint64(max(pending, 0))
	}
	h.fast, h.ahead, h.held = path, map[string]aheadEvent{}, map[string]heldEvent{}
	h.fastOK, h.okEpoch = true, path.epoch()
}

// stopFastLocked ends the fast path and forgets what it relayed.
func (h *hub) stopFastLocked() {
	if h.fast != nil && h.fast.sub != nil {
		_ = h.fast.sub.Unsubscribe()
	}
	h.fast, h.ahead, h.held, h.relayed = nil, nil, nil, idRing{}
}

// relayAhead relays an event of the fast path (from path) to every subscriber now,
// unless it was relayed already (by the feed, or a second copy of a publish sent
// again).
func (h *hub) relayAhead(path *fastPath, msg *nats.Msg) {
	defer func() {
		path.handled.Add(1)
		select {
		case path.tick <- struct{}{}:
		default:
		}
	}()
	id := msg.Header.Get(jetstream.MsgIDHeader)
	if id == "" {
		return // nothing to know its stored copy by: the feed relays it
	}
	ev, err := cloudevent.DecodeHeaders(msg)
	if err != nil {
		return // the feed logs it
	}
	it := item{seq: seqAhead, vm: ev.VM, frame: appendCloudEvent(nil, ev)}
	now := time.Now()
	epoch := path.epoch() // read before mu: the callback runs while other goroutines hold the connection's lock
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.fast != path {
		return // a fast path that has stopped
	}
	_, ahead := h.ahead[id]
	_, held := h.held[id]
	if ahead || held || h.relayed.has(id) {
		return
	}
	if now.Sub(h.lastPrune) > time.Second {
		h.lastPrune = now
		forgetBefore(h.ahead, func(a aheadEvent) time.Time { return a.at }, now.Add(-aheadTTL))
		forgetBefore(h.held, func(e heldEvent) time.Time { return e.at }, now.Add(-aheadTTL))
	}
	if h.fastOK && epoch != h.okEpoch {
		h.fastOK = false // a reconnect or a drop: what was lost comes from the feed first
	}
	if !h.fastOK {
		h.held[id] = heldEvent{epoch: epoch, at: now}
		return
	}
	h.aheadN++
	h.ahead[id] = aheadEvent{n: h.aheadN, at: now}
	h.deliverLocked(it, 0)
}

// forgetBefore deletes the events of m heard (at) before cutoff: the feed will not
// bring them any more.
func forgetBefore[E any](m map[string]E, at func(E) time.Time, cutoff time.Time) {
	for k, e := range m {
		if at(e).Before(cutoff) {
			delete(m, k)
		}
	}
}

// feedEvent is what the fast path's bookkeeping says of an event the feed brings.
type feedEvent struct {
	gotAhead uint64 // subscribers that joined before this had it from the fast path (0: none)
	skip     bool   // every subscriber had it
	// agree: the fast path heard it in the current epoch (epoch) and held nothing else:
	// once it is relayed, the fast path may relay at once again (deliverStored).
	agree bool
	epoch uint64
	path  *fastPath
}

// fromFeed does the fast path's bookkeeping for an event the feed brings (its
// Nats-Msg-Id).
func (h *hub) fromFeed(id string) feedEvent {
	h.mu.Lock()
	path := h.fast
	h.mu.Unlock()
	if path == nil || id == "" {
		return feedEvent{}
	}
	path.catchUp()
	epoch := path.epoch()
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.fast != path {
		return feedEvent{}
	}
	h.relayed.add(id)
	if a, ok := h.ahead[id]; ok {
		delete(h.ahead, id)
		return feedEvent{gotAhead: a.n, skip: h.lastJoined < a.n}
	}
	if hv, ok := h.held[id]; ok {
		delete(h.held, id)
		return feedEvent{agree: !h.fastOK && hv.epoch == epoch && len(h.held) == 0, epoch: epoch, path: path}
	}
	// An event the fast path has not heard: lost, or its copy is late. Relaying later
	// events at once could put them before one still to come from the feed.
	h.fastOK = false
	return feedEvent{}
}

// deliverStored relays an event of the feed to every subscriber but those that had it
// from the fast path; if the feed and the fast path agree again, the fast path relays
// at once from now on: every event it heard is relayed, and it has lost nothing since.
func (h *hub) deliverStored(fe feedEvent, it item) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.deliverLocked(it, fe.gotAhead) {
		h.stored++
	}
	// What the fast path heard meanwhile is held: it must come from the feed first.
	if fe.agree && h.fast == fe.path && !h.fastOK && len(h.held) == 0 {
		h.fastOK, h.okEpoch = true, fe.epoch
	}
}

// relayedCounts counts the events relayed first from the fast path and from the
// feed (to at least one subscriber that had not had them).
func (h *hub) relayedCounts() (published, stored uint64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.aheadN, h.stored
}
