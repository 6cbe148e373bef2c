package cloudevent

import (
	"context"
	"fmt"
	"reflect"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/bus/subject"
)

func TestEncodeDecode(t *testing.T) {
	ctx := context.Background()
	in := New("work", "property-set:label", "name", "label", "newvalue", "green", "oldvalue", "red")
	msg, err := Encode(ctx, "h1", in)
	if err != nil {
		t.Fatal(err)
	}
	if msg.Subject != subject.ForHost("h1").Event("work", "property-set:label") {
		t.Fatalf("subject %q", msg.Subject)
	}
	for _, h := range []string{"ce-id", "ce-source", "ce-specversion", "ce-type", "ce-subject", "ce-qubesevent"} {
		if msg.Header.Get(h) == "" {
			t.Errorf("header %s missing (binary mode)", h)
		}
	}
	if got := string(msg.Data); got != `{"name":"label","newvalue":"green","oldvalue":"red"}` {
		t.Errorf("data %s", got)
	}
	out, ev, err := Decode(ctx, msg)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(out, in) {
		t.Fatalf("round trip: %+v != %+v", out, in)
	}
	if fast, err := DecodeHeaders(msg); err != nil || !reflect.DeepEqual(fast, in) {
		t.Fatalf("DecodeHeaders: %+v %v, want %+v", fast, err, in)
	}
	if ev.Type() != "org.qubes-os.property-set:label" || ev.Source() != "/qubes/h1" || ev.Subject() != "work" {
		t.Fatalf("cloudevent attributes: %s", ev)
	}
	// Key order survives even when it is not alphabetical.
	rev := New("", "domain-add", "vm", "newvm", "a", "1")
	msg, _ = Encode(ctx, "h1", rev)
	if out, _, err := Decode(ctx, msg); err != nil || !reflect.DeepEqual(out, rev) {
		t.Fatalf("global event: %+v %v", out, err)
	}
}

func TestPublishToStream(t *testing.T) {
	ctx, _, s, p := withStream(t, 10*time.Second)
	evs := []Event{New("work", "domain-pre-start", "start_guid", "True"), New("work", "domain-start"), New("", "domain-add", "vm", "x")}
	if err := p.Publish(ctx, evs...); err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.State.Msgs != 3 {
		t.Fatalf("stream holds %d messages, want 3", info.State.Msgs)
	}
	for i, want := range evs {
		m, err := s.GetMsg(ctx, uint64(i+1))
		if err != nil {
			t.Fatal(err)
		}
		msg := rawToMsg(m)
		got, _, err := Decode(ctx, msg)
		if err != nil || !reflect.DeepEqual(got, want) {
			t.Fatalf("seq %d: %+v %v, want %+v", i+1, got, err, want)
		}
	}
}

// While the stream cannot answer (here: it does not exist yet, as when its leader is
// being elected) Publish keeps trying until the caller's deadline, and an event sent
// twice is stored once.
func TestPublishWaitsForTheStreamAndStoresOnce(t *testing.T) {
	ns := bustest.RunJetStream(t)
	nc := bustest.Connect(t, ns)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	p := NewPublisher(js, "local")
	evs := []Event{New("work", "domain-pre-start", "start_guid", "True"), New("work", "domain-start")}
	done := make(chan error, 1)
	go func() { done <- p.Publish(ctx, evs...) }()
	// A send beyond the two events is a retry: Publish found no stream and keeps
	// trying. (A subscriber on the subject, to see it, would answer for the stream.)
	bustest.CheckFor(t, 10*time.Second, time.Millisecond, func() error {
		if n := nc.Stats().OutMsgs; n <= uint64(len(evs)) {
			return fmt.Errorf("%d sends", n)
		}
		return nil
	})
	select {
	case err := <-done:
		t.Fatalf("publish ended with no stream: %v", err)
	default:
	}
	s, err := EnsureStream(ctx, js, StreamConfig{})
	if err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("publish once the stream answers: %v", err)
	}
	msg, err := Encode(ctx, "local", New("work", "domain-spawn", "start_guid", "True"))
	if err != nil {
		t.Fatal(err)
	}
	for range 2 { // a publish whose ack was lost, sent again
		if _, err := js.PublishMsg(ctx, msg); err != nil {
			t.Fatal(err)
		}
	}
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.State.Msgs != 3 {
		t.Fatalf("stream holds %d events, want 3 (two published late, one sent twice)", info.State.Msgs)
	}
	for i, want := range []string{"domain-pre-start", "domain-start", "domain-spawn"} {
		m, err := s.GetMsg(ctx, uint64(i+1))
		if err != nil {
			t.Fatal(err)
		}
		if got, _, err := Decode(ctx, rawToMsg(m)); err != nil || got.Name != want {
			t.Fatalf("seq %d: %s %v, want %s", i+1, got.Name, err, want)
		}
	}
}

// Sends made one after another (as under a caller's lock) and waited for afterwards,
// concurrently, are stored in the order they were sent.
func TestSendKeepsOrderAcrossWaits(t *testing.T) {
	ctx, _, s, p := withStream(t, 20*time.Second)
	const sends = 50
	waits := make(chan func(context.Context) error, sends)
	for i := range sends {
		waits <- p.Send(ctx, New("work", "domain-feature-pre-set:n", "value", strconv.Itoa(i)),
			New("work", "domain-feature-set:n", "value", strconv.Itoa(i)))
	}
	close(waits)
	errs := make(chan error, sends)
	for wait := range waits {
		go func() { errs <- wait(ctx) }()
	}
	for range sends {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	for seq := uint64(1); seq <= 2*sends; seq++ {
		m, err := s.GetMsg(ctx, seq)
		if err != nil {
			t.Fatal(err)
		}
		got, _, err := Decode(ctx, rawToMsg(m))
		if err != nil {
			t.Fatal(err)
		}
		want := strconv.Itoa(int(seq-1) / 2)
		if len(got.Kwargs) != 1 || got.Kwargs[0].Value != want {
			t.Fatalf("seq %d: %s %v, want value %q", seq, got.Name, got.Kwargs, want)
		}
	}
}
