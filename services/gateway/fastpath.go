package gateway

// The fast path of admin.Events: see hub.

import (
	"math"
	"sync"
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
	// queued) and the events the tap passed; handled, those relayed (or dropped), each
	// followed by a tick.
	received func() uint64
	handled  atomic.Uint64
	tick     chan struct{}

	// The tap's side (EventsConfig.Tap): Heard queues what the services of this
	// process send; the sender relays it when it waits (Sent), or tapLoop if it is
	// first: whoever holds drainMu relays the queue, in order. tapped counts what
	// Heard queued.
	hub     *hub
	tapped  atomic.Uint64
	tapMu   sync.Mutex
	tapQ    []tappedEvent
	drainMu sync.Mutex
	spare   []tappedEvent // the queue's other buffer, under drainMu
	tapWake chan struct{}
	tapQuit chan struct{}
	stopTap func()
	// natsReceived counts the messages the subscription has received, natsHandled
	// those relayAhead is done with, each followed by a natsTick: a tapped event waits
	// for the messages received before it was sent (see tapLoop).
	natsReceived func() uint64
	natsHandled  atomic.Uint64
	natsTick     chan struct{}
}

// tappedEvent is an event the tap heard, with its Nats-Msg-Id and the count of
// messages the subscription had received then.
type tappedEvent struct {
	id    string
	ev    cloudevent.Event
	after uint64
}

// Heard is the tap's listener (cloudevent.Listener): it runs on a publisher's
// goroutine, perhaps under its caller's locks, so it only queues.
func (p *fastPath) Heard(id string, ev cloudevent.Event) {
	after := p.natsReceived()
	p.tapMu.Lock()
	p.tapQ = append(p.tapQ, tappedEvent{id, ev, after})
	p.tapMu.Unlock()
	p.tapped.Add(1)
	signal(p.tapWake)
}

// Sent relays what the tap heard on the goroutine of a sender that waits for its
// events, done with its own locks: at once, where a hand-off to tapLoop waited for
// the scheduler (about 85 µs at the median on the 2-vCPU VM, 250 µs at 100
// subscribers, behind the goroutines of the publish itself, so that the event's copy
// from NATS came first two times in three). It returns once the sender's events are
// relayed, by it or by the goroutine relaying when it came: the sender's caller may
// reply next, and an event that reply causes comes after them.
func (p *fastPath) Sent() { p.hub.drainTap(p, true) }

// done marks one message or tapped event handled.
func (p *fastPath) done() {
	p.handled.Add(1)
	signal(p.tick)
}

// signal wakes the waiter of a channel of one, if it is not awake already.
func signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// awaitNATS returns once relayAhead has handled the first n messages of the
// subscription.
func (p *fastPath) awaitNATS(n uint64) { waitCount(&p.natsHandled, n, p.natsTick) }

// waitCount returns once count reaches target, looking again at each tick, or after
// catchUpWait: the count always grows while its subscription is open, so the bound
// only guards one closed under it.
func waitCount(count *atomic.Uint64, target uint64, tick <-chan struct{}) {
	waitCountWithin(count, target, tick, catchUpWait)
}

// waitCountWithin is waitCount with a bound of its own.
func waitCountWithin(count *atomic.Uint64, target uint64, tick <-chan struct{}, bound time.Duration) {
	if count.Load() >= target {
		return
	}
	timeout := time.NewTimer(bound)
	defer timeout.Stop()
	for count.Load() < target {
		select {
		case <-tick:
		case <-timeout.C:
			return
		}
	}
}

// catchUpWait bounds how long the feed waits for the fast path, or a tapped event for
// the subscription, to handle what it has received (waitCount).
const catchUpWait = 100 * time.Millisecond

// catchUp returns once the fast path has handled every message it had received when
// catchUp was called. Both copies of an event come over the gateway's one connection,
// the published one first, but the feed and the fast path read them in two
// goroutines: without this, the feed would often take the lead and find an event the
// fast path has not heard yet, which reads as a loss. (Now and then the server sends
// the consumer's copy first all the same, the published one right after it: about
// once in 30 runs of TestHubTapRelaysOwnEventsOnceInOrder under -race. fromFeed then
// gives the fast path one more message's time, awaitLateCopy.)
func (p *fastPath) catchUp() {
	if p.received != nil {
		waitCount(&p.handled, p.received(), p.tick)
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

// startFast subscribes to the host's events as they are published, and listens to
// the tap if there is one. Without it (an error, or a permission the server refuses
// later) the feed relays everything, only later. The caller holds mu.
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
	path := &fastPath{tick: make(chan struct{}, 1), natsTick: make(chan struct{}, 1)}
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
	path.natsReceived = func() uint64 { return subscriptionReceived(sub, &path.natsHandled) }
	path.received = func() uint64 { return path.natsReceived() + path.tapped.Load() }
	if t := h.e.cfg.Tap; t != nil {
		path.hub, path.tapWake, path.tapQuit = h, make(chan struct{}, 1), make(chan struct{})
		go h.tapLoop(path)
		path.stopTap = t.Listen(path)
	}
	h.fast, h.ahead, h.held = path, map[string]aheadEvent{}, map[string]heldEvent{}
	h.fastOK, h.okEpoch = true, path.epoch()
}

// subscriptionReceived counts the messages sub has received: those delivered to its
// callback (in it, or done) and those waiting. The two are read apart, so they are
// read again while a message moved from one to the other in between (it would count
// in neither, or in both). A closed subscription receives nothing more: what it
// received is what its callback handled.
func subscriptionReceived(sub *nats.Subscription, handled *atomic.Uint64) uint64 {
	for try := 0; ; try++ {
		d1, err1 := sub.Delivered()
		pending, _, err2 := sub.Pending()
		d2, err3 := sub.Delivered()
		if err1 != nil || err2 != nil || err3 != nil {
			return handled.Load()
		}
		if d1 == d2 || try == 3 {
			return uint64(max(d1, 0)) + uint64(max(pending, 0))
		}
	}
}

// stopFastLocked ends the fast path and forgets what it relayed.
func (h *hub) stopFastLocked() {
	if p := h.fast; p != nil {
		if p.sub != nil {
			_ = p.sub.Unsubscribe()
		}
		if p.stopTap != nil {
			p.stopTap()
			close(p.tapQuit)
		}
	}
	h.fast, h.ahead, h.held, h.relayed = nil, nil, nil, idRing{}
}

// tapLoop relays what the tap hears that no sender relays first (see Sent), until
// the fast path stops.
func (h *hub) tapLoop(path *fastPath) {
	for {
		select {
		case <-path.tapQuit:
			return
		case <-path.tapWake:
			h.drainTap(path, false)
		}
	}
}

// drainTap relays the tap's queue, in order. Unless wait, it leaves the queue to
// another goroutine at it: that one relays what is queued now as well, for it looks
// again once it has let go.
//
// A tapped event comes after what the gateway's connection had received when it was
// sent: an event of a service of another process, say, that a dom0 tool saw the reply
// of (the reply came over that connection, after the event) before its next call made
// this one. So it is relayed only once the subscription has handled those messages;
// otherwise it would overtake them, as no two events published one after the other
// through one server do. (The tap cannot tell an event whose cause reached this
// process by another connection: two such publishers are ordered as if concurrent.)
func (h *hub) drainTap(path *fastPath, wait bool) {
	for {
		if wait {
			path.drainMu.Lock()
		} else if !path.drainMu.TryLock() {
			return
		}
		for {
			path.tapMu.Lock()
			batch := path.tapQ
			path.tapQ = path.spare[:0]
			path.tapMu.Unlock()
			if len(batch) == 0 {
				path.spare = batch
				break
			}
			for i := range batch {
				path.awaitNATS(batch[i].after)
				h.relay(path, batch[i].id, nil, &batch[i].ev, true)
				path.done()
			}
			clear(batch)
			path.spare = batch
		}
		path.drainMu.Unlock()
		path.tapMu.Lock()
		more := len(path.tapQ) > 0
		path.tapMu.Unlock()
		if !more {
			return
		}
		wait = false // its own are relayed: it only takes up what came meanwhile
	}
}

// relayAhead relays an event of the fast path's subscription (from path).
func (h *hub) relayAhead(path *fastPath, msg *nats.Msg) {
	defer func() {
		path.natsHandled.Add(1)
		signal(path.natsTick)
		path.done()
	}()
	id := msg.Header.Get(jetstream.MsgIDHeader)
	if id == "" {
		return // nothing to know its stored copy by: the feed relays it
	}
	h.relay(path, id, msg, nil, false)
}

// relay relays an event of the fast path to every subscriber now, unless it was
// relayed already (a copy from the tap, from the feed, or of a publish sent again).
// ev is the event, or nil to decode it from msg; tapped says the tap heard it.
func (h *hub) relay(path *fastPath, id string, msg *nats.Msg, ev *cloudevent.Event, tapped bool) {
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
		return // the copy from NATS of a tapped event is not decoded
	}
	if ev == nil {
		dev, err := cloudevent.DecodeHeaders(msg)
		if err != nil {
			return // the feed logs it
		}
		ev = &dev
	}
	if now.Sub(h.lastPrune) > time.Second {
		h.lastPrune = now
		forgetBefore(h.ahead, func(a aheadEvent) time.Time { return a.at }, now.Add(-aheadTTL))
		forgetBefore(h.held, func(e heldEvent) time.Time { return e.at }, now.Add(-aheadTTL))
	}
	if h.fastOK && epoch != h.okEpoch {
		h.fastOK = false // a reconnect or a drop: what was lost comes from the feed first
	}
	if h.awaiting != "" && id != h.awaiting {
		h.fastOK = false // the copy the feed waits for is lost: this one comes after it
	}
	if !h.fastOK {
		h.held[id] = heldEvent{epoch: epoch, at: now}
		return
	}
	h.aheadN++
	if tapped {
		h.tappedN++
	}
	h.ahead[id] = aheadEvent{n: h.aheadN, at: now}
	h.deliverLocked(item{seq: seqAhead, vm: ev.VM, frame: appendCloudEvent(nil, *ev)}, 0)
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
	for waited := false; ; waited = true {
		epoch := path.epoch()
		h.mu.Lock()
		if h.fast != path {
			h.mu.Unlock()
			return feedEvent{}
		}
		if a, ok := h.ahead[id]; ok {
			defer h.mu.Unlock()
			h.relayed.add(id)
			delete(h.ahead, id)
			return feedEvent{gotAhead: a.n, skip: h.lastJoined < a.n}
		}
		if hv, ok := h.held[id]; ok {
			defer h.mu.Unlock()
			h.relayed.add(id)
			delete(h.held, id)
			return feedEvent{agree: !h.fastOK && hv.epoch == epoch && len(h.held) == 0, epoch: epoch, path: path}
		}
		// An event the fast path has not heard: lost, or its copy is late. Now and
		// then the server sends the consumer's copy first and the published one right
		// after it (catchUp): a trusted fast path gets one more message's time, up to
		// lateCopyWait, before it is judged to have lost the event.
		if !waited && h.fastOK && path.received != nil {
			h.awaiting = id
			h.mu.Unlock()
			path.awaitLateCopy()
			h.mu.Lock()
			h.awaiting = ""
			h.mu.Unlock()
			continue
		}
		// Lost: relaying later events at once could put them before one still to come
		// from the feed.
		defer h.mu.Unlock()
		h.relayed.add(id)
		h.fastOK = false
		return feedEvent{}
	}
}

// lateCopyWait bounds how long the feed waits for the published copy of an event it
// brought first (fromFeed). The two are sent microseconds apart; a copy that is lost
// costs this once, before the fast path is no longer trusted.
const lateCopyWait = 5 * time.Millisecond

// awaitLateCopy returns once the fast path has handled one message more than it had
// received when called, or after lateCopyWait.
func (p *fastPath) awaitLateCopy() {
	waitCountWithin(&p.handled, p.received()+1, p.tick, lateCopyWait)
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

// relayedCounts counts the events relayed first (to at least one subscriber that had
// not had them) from the tap, from the fast path's subscription and from the feed.
func (h *hub) relayedCounts() (tapped, published, stored uint64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.tappedN, h.aheadN - h.tappedN, h.stored
}
