package gateway

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

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
	hh.h.deliver(item{seq: 1 << 40, vm: "work", frame: marker})
	got = make([]byte, len(marker))
	if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, marker) {
		t.Fatalf("after the frames: %q %v, want only the marker", got, err)
	}
}

// The fast path and the feed bring the same event; every subscriber gets it once:
// from the fast path if it had joined by then, else from the feed. A second fast
// copy (a publish sent again), a fast copy after the feed's, and a fast path that
// has stopped relay nothing.
func TestHubFastPathRelaysEachEventOnce(t *testing.T) {
	hh := newHubHarness(t, 256)
	path := &fastPath{}
	hh.h.mu.Lock()
	hh.h.fast, hh.h.ahead = path, map[string]aheadEvent{}
	hh.h.mu.Unlock()

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
	if hh.h.hadAhead(id1) {
		t.Fatal("the feed skips event 1, which late has not had")
	}
	hh.h.deliverStored(id1, item{seq: 5, vm: "work", frame: frame1})

	// Event 2 comes from the feed first; its fast copy comes late.
	id2, ahead2, frame2, _ := encoded(t, 2)
	hh.h.deliverStored(id2, item{seq: 6, vm: "work", frame: frame2})
	ahead2(hh.h, path)

	// Event 3 reaches a fast path that has stopped: only the feed relays it.
	id3, ahead3, frame3, _ := encoded(t, 3)
	ahead3(hh.h, &fastPath{})
	hh.h.deliverStored(id3, item{seq: 7, vm: "work", frame: frame3})

	// Event 4 reaches both from the fast path: the feed's copy is not decoded.
	id4, ahead4, frame4, _ := encoded(t, 4)
	ahead4(hh.h, path)
	if !hh.h.hadAhead(id4) {
		t.Fatal("every subscriber had event 4, yet the feed relays it")
	}

	want := slicesConcat(frame1, frame2, frame3, frame4)
	readExactly(t, hh, earlyClient, want)
	readExactly(t, hh, lateClient, slicesConcat(want, frameN("work", -1, 0)))
	hh.h.mu.Lock()
	defer hh.h.mu.Unlock()
	if len(hh.h.ahead) != 0 {
		t.Errorf("%d events still awaited from the feed", len(hh.h.ahead))
	}
}

func slicesConcat(bs ...[]byte) []byte { return bytes.Join(bs, nil) }

// On a real server: subscribers get every event once and in order while both paths
// run, and still every event once the fast path hears nothing more (a reconnect, a
// slow consumer): the feed relays them, later.
func TestHubFeedCoversWhatTheFastPathMisses(t *testing.T) {
	ns := bustest.RunJetStream(t)
	nc := bustest.Connect(t, ns)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := cloudevent.EnsureStream(ctx, js, cloudevent.StreamConfig{}); err != nil {
		t.Fatal(err)
	}
	e, err := NewEvents(EventsConfig{}, nc, subject.ForHost("h1"), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	server, client := socketPair(t)
	sub, err := newSubscriber(server, "")
	if err != nil {
		t.Fatal(err)
	}
	if err := e.hub.add(sub); err != nil {
		t.Fatal(err)
	}
	defer e.hub.remove(sub)
	start, err := e.nextSequence(ctx)
	if err != nil {
		t.Fatal(err)
	}
	pctx, stop := context.WithCancel(ctx)
	pumped := make(chan struct{})
	go func() { defer close(pumped); e.pump(pctx, server, sub, start, "test") }()
	defer func() { stop(); <-pumped }()
	if err := nc.Flush(); err != nil { // the fast path's subscription is on the server
		t.Fatal(err)
	}

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

	got := make([]byte, want.Len())
	_ = client.SetReadDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.ReadFull(client, got); err != nil {
		t.Fatalf("read: %v", err)
	}
	if !bytes.Equal(got, want.Bytes()) {
		t.Fatalf("frames differ from the events published, in order, once each (first difference at byte %d)", firstDiff(got, want.Bytes()))
	}
	// No copy follows: the next frame is a new event's.
	publish(600, 601)
	last := want.Bytes()[len(got):]
	got = make([]byte, len(last))
	if _, err := io.ReadFull(client, got); err != nil || !bytes.Equal(got, last) {
		t.Fatalf("after 600 events: %q %v, want only event 600", got, err)
	}
	t.Logf("fast path relayed %d of the first 300 events", fastSeen)
}
