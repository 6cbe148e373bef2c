package cloudevent

import (
	"fmt"
	"reflect"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// tapRecord collects what a tap's listener heard.
type tapRecord struct {
	mu     sync.Mutex
	ids    []string
	events []Event
	sent   int
}

func (r *tapRecord) Heard(id string, e Event) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.ids, r.events = append(r.ids, id), append(r.events, e)
}

func (r *tapRecord) Sent() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.sent++
}

func (r *tapRecord) sends() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.sent
}

func (r *tapRecord) taken() ([]string, []Event) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.ids...), append([]Event(nil), r.events...)
}

// The listener hears every event a tapped publisher sends, in order, by the id the
// stream stores it under, and is told when the sender waits; it hears nothing once
// stopped, and a listener that replaced another is not stopped by the other's stop.
func TestTapHearsWhatIsStoredInOrder(t *testing.T) {
	ctx, nc, stream, pub := withStream(t, time.Minute)
	var tap Tap
	pub.WithTap(&tap)
	var first tapRecord
	stopFirst := tap.Listen(&first)

	var sent []Event
	for i := range 20 {
		evs := []Event{New("work", "domain-feature-set:f", "feature", "f", "value", fmt.Sprint(i)),
			New("", "domain-add", "vm", fmt.Sprint("q", i))}
		if err := pub.Publish(ctx, evs...); err != nil {
			t.Fatal(err)
		}
		sent = append(sent, evs...)
	}
	if n := first.sends(); n != 20 {
		t.Fatalf("told of %d waits, want one per Publish (20)", n)
	}
	// Send tells of the wait when the caller waits, not before.
	wait := pub.Send(ctx, New("work", "domain-feature-set:f", "feature", "f", "value", "sent"))
	if n := first.sends(); n != 20 {
		t.Fatalf("told of a wait before it (%d)", n)
	}
	if err := wait(ctx); err != nil {
		t.Fatal(err)
	}
	if n := first.sends(); n != 21 {
		t.Fatalf("told of %d waits after Send's wait, want 21", n)
	}
	sent = append(sent, New("work", "domain-feature-set:f", "feature", "f", "value", "sent"))
	ids, heard := first.taken()
	if !reflect.DeepEqual(heard, sent) {
		t.Fatalf("heard %v, want the events sent, in order: %v", heard, sent)
	}
	for i, id := range ids {
		m, err := stream.GetMsg(ctx, uint64(i+1))
		if err != nil {
			t.Fatal(err)
		}
		if got := m.Header.Get(jetstream.MsgIDHeader); got != id {
			t.Fatalf("event %d heard as %q, stored as %q", i, id, got)
		}
		e, _, err := Decode(ctx, rawToMsg(m))
		if err != nil || !reflect.DeepEqual(e, sent[i]) {
			t.Fatalf("stored event %d: %v %v, want %v", i, e, err, sent[i])
		}
	}

	var second tapRecord
	stopSecond := tap.Listen(&second)
	stopFirst() // not the listener any more: stops nothing
	if err := pub.Publish(ctx, New("work", "domain-start")); err != nil {
		t.Fatal(err)
	}
	if ids, _ := first.taken(); len(ids) != len(sent) {
		t.Fatalf("the replaced listener heard %d events, want %d", len(ids), len(sent))
	}
	if _, got := second.taken(); len(got) != 1 || got[0].Name != "domain-start" {
		t.Fatalf("the listener heard %v, want domain-start", got)
	}
	stopSecond()
	if err := pub.Publish(ctx, New("work", "domain-shutdown")); err != nil {
		t.Fatal(err)
	}
	if _, got := second.taken(); len(got) != 1 {
		t.Fatalf("a stopped listener heard %v", got)
	}

	// A publisher without a tap, or with a nil one, sends as before.
	js, _ := jetstream.New(nc)
	plain := NewPublisher(js, "local").WithTap(nil)
	if err := plain.Publish(ctx, New("work", "domain-paused")); err != nil {
		t.Fatal(err)
	}
}
