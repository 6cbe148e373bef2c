package gateway

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/sys/unix"

	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/bus/cloudevent"
	"github.com/qubesbus/qubesbus/bus/subject"
)

// encoded is an event as published, and the frame subscribers must get for it.
func encoded(t *testing.T, i int) (msgID string, ahead func(*hub, *fastPath), frame []byte, ev cloudevent.Event) {
	t.Helper()
	ev = cloudevent.New("work", "domain-feature-set:test", "feature", "test", "value", fmt.Sprint(i))
	msg, err := cloudevent.Encode(context.Background(), "h1", ev)
	if err != nil {
		t.Fatal(err)
	}
	return msg.Header.Get(jetstream.MsgIDHeader), func(h *hub, p *fastPath) { h.relayAhead(p, msg) }, appendCloudEvent(nil, ev), ev
}

// readExactly reads n bytes from a subscriber's client end, then makes sure nothing
// more is there.
func readExactly(t *testing.T, hh *hubHarness, c interface {
	io.Reader
	SetReadDeadline(time.Time) error
}, want []byte) {
	t.Helper()
	got := make([]byte, len(want))
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read %q %v, want %q", got, err, want)
	}
	// Nothing follows: a marker delivered now is the next frame.
	marker := frameN("work", -1, 0)
	hh.h.deliverStored(feedEvent{}, item{seq: 1 << 40, vm: "work", frame: marker})
	got = make([]byte, len(marker))
	if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, marker) {
		t.Fatalf("after the frames: %q %v, want only the marker", got, err)
	}
}

// trustFast makes path the hub's fast path, trusted.
func (hh *hubHarness) trustFast(path *fastPath) {
	hh.h.mu.Lock()
	defer hh.h.mu.Unlock()
	hh.h.fast, hh.h.ahead, hh.h.held, hh.h.fastOK = path, map[string]aheadEvent{}, map[string]heldEvent{}, true
}

// fastOK reports whether the hub trusts its fast path.
func (hh *hubHarness) fastOK() bool {
	hh.h.mu.Lock()
	defer hh.h.mu.Unlock()
	return hh.h.fastOK
}

// fromTheFeed hands the hub an event as its feed brings it.
func fromTheFeed(h *hub, id string, it item) {
	if fe := h.fromFeed(id); !fe.skip {
		h.deliverStored(fe, it)
	}
}

// The fast path and the feed bring the same event; every subscriber gets it once:
// from the fast path if it had joined by then, else from the feed. A second fast
// copy (a publish sent again), a fast copy after the feed's, and a fast path that
// has stopped relay nothing. Once the fast path may have missed an event (the feed
// brings one it has not heard, or a reconnect or drop), what it hears waits for the
// feed, in the feed's order, until the two agree again.
func TestHubFastPathRelaysEachEventOnceInOrder(t *testing.T) {
	hh := newHubHarness(t, 256)
	var losses uint64 // the path's epoch: reconnects and drops
	path := &fastPath{epoch: func() uint64 { return losses }}
	hh.trustFast(path)
	fastOK := hh.fastOK

	early, _, earlyClient, _ := hh.subscribe("", 1)
	waitDirect(early)
	id1, ahead1, frame1, _ := encoded(t, 1)
	ahead1(hh.h, path) // early has it now
	// late joins between the fast copy and the feed's: only the feed gives it event 1.
	late, _, lateClient, _ := hh.subscribe("", 1)
	hh.h.mu.Lock()
	late.joined, hh.h.lastJoined = hh.h.aheadN, hh.h.aheadN
	hh.h.mu.Unlock()
	waitDirect(late)
	ahead1(hh.h, path) // a second copy of the same publish
	fe := hh.h.fromFeed(id1)
	if fe.skip {
		t.Fatal("the feed skips event 1, which late has not had")
	}
	hh.h.deliverStored(fe, item{seq: 5, vm: "work", frame: frame1})

	// Event 2 reaches both from the fast path: the feed's copy is not decoded.
	id2, ahead2, frame2, _ := encoded(t, 2)
	ahead2(hh.h, path)
	if fe := hh.h.fromFeed(id2); !fe.skip {
		t.Fatal("every subscriber had event 2, yet the feed relays it")
	}

	// Event 3 comes from the feed first (its fast copy was lost, or is late): the
	// fast path is no longer trusted, and its late copy relays nothing.
	id3, ahead3, frame3, _ := encoded(t, 3)
	fromTheFeed(hh.h, id3, item{seq: 7, vm: "work", frame: frame3})
	ahead3(hh.h, path)
	if fastOK() {
		t.Fatal("the fast path missed event 3, yet it is still trusted")
	}
	// Event 4 is heard but waits for the feed; its coming makes the two agree again.
	id4, ahead4, frame4, _ := encoded(t, 4)
	ahead4(hh.h, path)
	fromTheFeed(hh.h, id4, item{seq: 8, vm: "work", frame: frame4})
	if !fastOK() {
		t.Fatal("the feed brought the only event held, heard in this epoch: the fast path is trusted again")
	}
	// Event 5 reaches a fast path that has stopped: only the feed relays it.
	id5, ahead5, frame5, _ := encoded(t, 5)
	ahead5(hh.h, &fastPath{epoch: func() uint64 { return losses }})
	fromTheFeed(hh.h, id5, item{seq: 9, vm: "work", frame: frame5})
	if fastOK() {
		t.Fatal("the fast path did not hear event 5, yet it is still trusted")
	}
	// Between the feed's bookkeeping for an event that makes the two agree and its
	// delivery, the fast path hears the next one: it waits too.
	id5b, ahead5b, frame5b, _ := encoded(t, 50)
	id5c, ahead5c, frame5c, _ := encoded(t, 51)
	ahead5b(hh.h, path)
	fe5b := hh.h.fromFeed(id5b)
	ahead5c(hh.h, path)
	hh.h.deliverStored(fe5b, item{seq: 10, vm: "work", frame: frame5b})
	if fastOK() {
		t.Fatal("event 51 is held, yet the fast path is trusted")
	}
	fromTheFeed(hh.h, id5c, item{seq: 10, vm: "work", frame: frame5c})
	if !fastOK() {
		t.Fatal("the feed brought event 51, the only one held: the fast path is trusted again")
	}

	// A reconnect: event 6 was lost with it, event 7 heard after it must wait for 6.
	losses++
	id6, _, frame6, _ := encoded(t, 6)
	id7, ahead7, frame7, _ := encoded(t, 7)
	ahead7(hh.h, path)
	fromTheFeed(hh.h, id6, item{seq: 10, vm: "work", frame: frame6})
	fromTheFeed(hh.h, id7, item{seq: 11, vm: "work", frame: frame7})
	if !fastOK() {
		t.Fatal("after the feed brought event 7 the fast path is trusted again")
	}
	// Event 8, heard before a drop and held, agrees with the feed only in its own
	// epoch: event 9, heard after the drop, waits too.
	hh.h.mu.Lock()
	hh.h.fastOK = false
	hh.h.mu.Unlock()
	id8, ahead8, frame8, _ := encoded(t, 8)
	ahead8(hh.h, path)
	losses++
	id9, ahead9, frame9, _ := encoded(t, 9)
	ahead9(hh.h, path)
	fromTheFeed(hh.h, id8, item{seq: 12, vm: "work", frame: frame8})
	if fastOK() {
		t.Fatal("event 8 was heard before the drop: it proves nothing after it")
	}
	fromTheFeed(hh.h, id9, item{seq: 13, vm: "work", frame: frame9})
	if !fastOK() {
		t.Fatal("event 9, heard after the drop, came from the feed with nothing held")
	}

	want := slicesConcat(frame1, frame2, frame3, frame4, frame5, frame5b, frame5c, frame6, frame7, frame8, frame9)
	readExactly(t, hh, earlyClient, want)
	readExactly(t, hh, lateClient, slicesConcat(want, frameN("work", -1, 0)))
	hh.h.mu.Lock()
	defer hh.h.mu.Unlock()
	if len(hh.h.ahead) != 0 || len(hh.h.held) != 0 {
		t.Errorf("%d events still awaited from the feed, %d held", len(hh.h.ahead), len(hh.h.held))
	}
}

func slicesConcat(bs ...[]byte) []byte { return bytes.Join(bs, nil) }

// When the feed brings an event first, a trusted fast path gets one more message's
// time for its copy (the server now and then sends the consumer's copy first): the
// late copy keeps it trusted and the event reaches the subscriber once. A copy that
// never comes costs that wait, and trust. Another event heard during the wait came
// after the awaited one: it waits for the feed, so order holds.
func TestHubWaitsForALateFastCopy(t *testing.T) {
	hh := newHubHarness(t, 256)
	var received atomic.Uint64 // what the path's subscription has received
	asked := make(chan struct{}, 64)
	path := &fastPath{epoch: func() uint64 { return 0 }, tick: make(chan struct{}, 1),
		received: func() uint64 { asked <- struct{}{}; return received.Load() }}
	hh.trustFast(path)
	fastOK := hh.fastOK
	sub, _, client, _ := hh.subscribe("", 1)
	waitDirect(sub)
	// feedWaits hands the feed an event and returns once the feed is waiting for its
	// fast copy (it has asked what the path received twice: catching up, then
	// waiting), with a channel closed when the feed is done with it.
	feedWaits := func(id string, it item) chan struct{} {
		t.Helper()
		done := make(chan struct{})
		go func() { fromTheFeed(hh.h, id, it); close(done) }()
		for range 2 {
			select {
			case <-asked:
			case <-done:
				t.Fatalf("the feed did not wait for the fast copy of %s", id)
			}
		}
		return done
	}

	// Event 1: its fast copy comes while the feed waits.
	id1, ahead1, frame1, _ := encoded(t, 1)
	done := feedWaits(id1, item{seq: 1, vm: "work", frame: frame1})
	received.Add(1)
	ahead1(hh.h, path)
	<-done
	if !fastOK() {
		t.Fatal("the late fast copy of event 1 came, yet the fast path is no longer trusted")
	}
	// Event 2: its fast copy never comes.
	id2, _, frame2, _ := encoded(t, 2)
	<-feedWaits(id2, item{seq: 2, vm: "work", frame: frame2})
	if fastOK() {
		t.Fatal("the fast path never heard event 2, yet it is still trusted")
	}
	// Event 3 makes the two agree again.
	id3, ahead3, frame3, _ := encoded(t, 3)
	received.Add(1)
	ahead3(hh.h, path)
	fromTheFeed(hh.h, id3, item{seq: 3, vm: "work", frame: frame3})
	<-asked // its catching up
	if !fastOK() {
		t.Fatal("event 3 came from both: the fast path is trusted again")
	}
	// Event 4 comes from the feed first, and the fast path hears event 5 meanwhile:
	// 4's copy is lost, and 5 must wait for the feed.
	id4, _, frame4, _ := encoded(t, 4)
	id5, ahead5, frame5, _ := encoded(t, 5)
	done = feedWaits(id4, item{seq: 4, vm: "work", frame: frame4})
	received.Add(1)
	ahead5(hh.h, path)
	<-done
	fromTheFeed(hh.h, id5, item{seq: 5, vm: "work", frame: frame5})

	readExactly(t, hh, client, slicesConcat(frame1, frame2, frame3, frame4, frame5))
}

// liveHub is admin.Events on a real JetStream server, with one dom0 subscriber whose
// pump runs until the test ends (or remove).
type liveHub struct {
	t       *testing.T
	ns      *server.Server
	nc      *nats.Conn
	js      jetstream.JetStream
	ctx     context.Context
	e       *Events
	sub     *subscriber
	client  *net.UnixConn
	removed bool
}

func startLiveHub(t *testing.T, cfg EventsConfig) *liveHub {
	t.Helper()
	lh := &liveHub{t: t, ns: bustest.RunJetStream(t)}
	lh.nc = bustest.Connect(t, lh.ns)
	var err error
	if lh.js, err = jetstream.New(lh.nc); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	lh.ctx = ctx
	if _, err := cloudevent.EnsureStream(ctx, lh.js, cloudevent.StreamConfig{}); err != nil {
		t.Fatal(err)
	}
	if lh.e, err = NewEvents(cfg, lh.nc, subject.ForHost("h1"), slog.New(slog.DiscardHandler)); err != nil {
		t.Fatal(err)
	}
	conn, client := socketPair(t)
	lh.client = client
	if lh.sub, err = newSubscriber(conn, ""); err != nil {
		t.Fatal(err)
	}
	if err := lh.e.hub.add(lh.sub); err != nil {
		t.Fatal(err)
	}
	start, err := lh.e.nextSequence(ctx)
	if err != nil {
		lh.remove()
		t.Fatal(err)
	}
	pctx, stop := context.WithCancel(ctx)
	pumped := make(chan struct{})
	go func() { defer close(pumped); lh.e.pump(pctx, conn, lh.sub, start, "test") }()
	t.Cleanup(func() { stop(); <-pumped; lh.remove() })
	if err := lh.nc.Flush(); err != nil { // the fast path's subscription is on the server
		t.Fatal(err)
	}
	return lh
}

// remove unregisters the subscriber (once).
func (lh *liveHub) remove() {
	if !lh.removed {
		lh.removed = true
		lh.e.hub.remove(lh.sub)
	}
}

// readAll reads want from the subscriber: the frames, in order, once each.
func (lh *liveHub) readAll(want []byte) {
	lh.t.Helper()
	got := make([]byte, len(want))
	_ = lh.client.SetReadDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.ReadFull(lh.client, got); err != nil {
		lh.t.Fatalf("read: %v", err)
	}
	if !bytes.Equal(got, want) {
		d := firstDiff(got, want)
		lh.t.Fatalf("frames differ from the events published, in order, once each (first difference at byte %d: got %q, want %q)", d, got[max(0, d-60):min(len(got), d+60)], want[max(0, d-60):min(len(want), d+60)])
	}
}

// On a real server: subscribers get every event once and in order while both paths
// run, and still every event once the fast path hears nothing more (a reconnect, a
// slow consumer): the feed relays them, later.
func TestHubFeedCoversWhatTheFastPathMisses(t *testing.T) {
	lh := startLiveHub(t, EventsConfig{})
	e, ctx, js := lh.e, lh.ctx, lh.js

	pub := cloudevent.NewPublisher(js, "h1")
	var want bytes.Buffer
	publish := func(from, to int) {
		for i := from; i < to; i++ {
			ev := cloudevent.New("work", "domain-feature-set:test", "feature", "test", "value", fmt.Sprint(i))
			if err := pub.Publish(ctx, ev); err != nil {
				t.Fatal(err)
			}
			want.Write(appendCloudEvent(nil, ev))
		}
	}
	publish(0, 300)
	e.hub.mu.Lock()
	fastSeen := e.hub.aheadN
	_ = e.hub.fast.sub.Unsubscribe() // the hub still takes the fast path for live
	e.hub.mu.Unlock()
	if fastSeen == 0 {
		t.Fatal("the fast path relayed none of the first 300 events")
	}
	publish(300, 600)
	lh.readAll(want.Bytes())
	want.Reset()
	// No copy follows: the next frame is a new event's.
	publish(600, 601)
	lh.readAll(want.Bytes())
	t.Logf("fast path relayed %d of the first 300 events", fastSeen)
}

// With a tap, the events of the gateway's own process are relayed as they are sent,
// before NATS brings them: once each, never ahead of an event of another publisher
// that the gateway's connection had received when they were sent, and with the fast
// path's subscription gone, still ahead of the feed; the tap is let go with the last
// subscriber.
func TestHubTapRelaysOwnEventsOnceInOrder(t *testing.T) {
	var tap cloudevent.Tap
	lh := startLiveHub(t, EventsConfig{Tap: &tap})
	e, ctx, js, nc, ns := lh.e, lh.ctx, lh.js, lh.nc, lh.ns

	own := cloudevent.NewPublisher(js, "h1").WithTap(&tap)
	var want bytes.Buffer
	event := func(i int) cloudevent.Event {
		ev := cloudevent.New("work", "domain-feature-set:test", "feature", "test", "value", fmt.Sprint(i))
		want.Write(appendCloudEvent(nil, ev))
		return ev
	}
	publish := func(p *cloudevent.Publisher, i int) {
		if err := p.Publish(ctx, event(i)); err != nil {
			t.Fatal(err)
		}
	}
	// A service of another process: a call over the gateway's connection makes it
	// publish an event, which it stores before it replies.
	otherNC := bustest.Connect(t, ns)
	otherJS, err := jetstream.New(otherNC)
	if err != nil {
		t.Fatal(err)
	}
	other := cloudevent.NewPublisher(otherJS, "h1")
	var pending cloudevent.Event
	if _, err := otherNC.Subscribe("test.call", func(m *nats.Msg) {
		err := other.Publish(ctx, pending)
		_ = m.Respond([]byte(fmt.Sprint(err)))
	}); err != nil {
		t.Fatal(err)
	}
	if err := otherNC.Flush(); err != nil {
		t.Fatal(err)
	}
	call := func(i int) {
		pending = event(i)
		rep, err := nc.Request("test.call", nil, 30*time.Second)
		if err != nil || string(rep.Data) != "<nil>" {
			t.Fatalf("call: %v %v", rep, err)
		}
	}
	readAll := func() {
		t.Helper()
		lh.readAll(want.Bytes())
		want.Reset()
	}

	for i := range 200 {
		if i%2 == 0 {
			publish(own, i)
		} else {
			call(i)
		}
	}
	readAll()
	e.hub.mu.Lock()
	path := e.hub.fast
	e.hub.mu.Unlock()
	if n := path.tapped.Load(); n != 100 {
		t.Fatalf("the tap passed %d events, want the 100 of the gateway's process", n)
	}

	// Without the subscription, what is relayed first is the tap's.
	e.hub.mu.Lock()
	_ = path.sub.Unsubscribe()
	before := e.hub.aheadN
	e.hub.mu.Unlock()
	for i := 200; i < 300; i++ {
		publish(own, i)
	}
	readAll()
	// The feed has brought the last event (it is in the socket only once): every one
	// of them was relayed ahead of it, none by the feed.
	e.hub.mu.Lock()
	relayedAhead := e.hub.aheadN - before
	e.hub.mu.Unlock()
	publish(own, 300) // and nothing follows but the next event
	readAll()
	// Not all 100 need come from the tap: now and then (under -race, about one run
	// in 30) the server hands the gateway's connection the consumer's copy of an
	// event of the other publisher before its copy as published. The feed then waits
	// lateCopyWait for it (TestHubWaitsForALateFastCopy); one later than that reads
	// as a loss, and the fast path holds what it hears until the two agree again.
	// But with the subscription gone, any that came ahead of the feed came from the
	// tap.
	if relayedAhead == 0 {
		t.Fatal("the tap relayed none of 100 events first")
	}
	t.Logf("the tap relayed %d of 100 events first", relayedAhead)

	lh.remove()
	heard := path.tapped.Load()
	publish(own, 301)
	if n := path.tapped.Load(); n != heard {
		t.Fatalf("the tap still passed events to a hub without subscribers (%d, then %d)", heard, n)
	}
}

// A sender that waits relays what the tap heard on its own goroutine: the frame is in
// the subscriber's socket when Sent returns, with no tapLoop running. Senders on
// several goroutines relay the queue in the order it was heard, each event once.
func TestTapRelaysOnTheSendersGoroutineInOrder(t *testing.T) {
	hh := newHubHarness(t, 1<<16)
	path := &fastPath{epoch: func() uint64 { return 0 }, natsReceived: func() uint64 { return 0 },
		tapWake: make(chan struct{}, 1)}
	path.hub = hh.h
	hh.h.mu.Lock()
	hh.h.fast, hh.h.ahead, hh.h.held, hh.h.fastOK = path, map[string]aheadEvent{}, map[string]heldEvent{}, true
	hh.h.mu.Unlock()
	s, _, client, _ := hh.subscribe("", 1)
	waitDirect(s)

	id, _, frame, ev := encoded(t, 0)
	path.Heard(id, ev)
	path.Sent()
	// What Sent wrote is in the socket already: one read that does not wait.
	got := make([]byte, 2*len(frame))
	rc, err := client.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var n int
	var rerr error
	if err := rc.Read(func(fd uintptr) bool { n, rerr = unix.Read(int(fd), got); return true }); err != nil || rerr != nil || !bytes.Equal(got[:max(n, 0)], frame) {
		t.Fatalf("right after Sent: %q %v %v, want %q", got[:max(n, 0)], err, rerr, frame)
	}

	// Heard under one lock, as a publisher's order; Sent after it, concurrently.
	const senders, each = 8, 200
	var order sync.Mutex
	var want bytes.Buffer
	next := 1
	var wg sync.WaitGroup
	for range senders {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range each {
				order.Lock()
				id, _, frame, ev := encoded(t, next)
				next++
				want.Write(frame)
				path.Heard(id, ev)
				order.Unlock()
				path.Sent()
			}
		}()
	}
	wg.Wait()
	readExactly(t, hh, client, want.Bytes())
	if n := path.tapped.Load(); n != senders*each+1 {
		t.Fatalf("heard %d, want %d", n, senders*each+1)
	}
}
