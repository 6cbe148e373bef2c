// Package recorder keeps the events a test caused, read back from QUBES_EVENTS, for
// comparing event sequences (a test helper, like bustest, which cloudevent's own tests
// use and so cannot hold this).
package recorder

import (
	"context"
	"sync"
	"testing"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus/cloudevent"
)

// Recorded is one event read back from QUBES_EVENTS with its stream sequence.
type Recorded struct {
	Seq   uint64
	Event cloudevent.Event
}

// Recorder keeps every event of a subject filter, read from QUBES_EVENTS with an
// ordered consumer and decoded with the CloudEvents SDK, for tests that compare event
// sequences.
type Recorder struct {
	stream jetstream.Stream
	mu     sync.Mutex
	all    []Recorded
}

// Record starts recording from the beginning of the stream; it stops when the
// test ends. Decoding failures fail the test.
func Record(t testing.TB, js jetstream.JetStream, filter string) *Recorder {
	t.Helper()
	ctx := context.Background()
	stream, err := js.Stream(ctx, cloudevent.StreamName)
	if err != nil {
		t.Fatal(err)
	}
	cons, err := js.OrderedConsumer(ctx, cloudevent.StreamName, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{filter}, DeliverPolicy: jetstream.DeliverAllPolicy,
	})
	if err != nil {
		t.Fatal(err)
	}
	r := &Recorder{stream: stream}
	cc, err := cons.Consume(func(m jetstream.Msg) {
		meta, err := m.Metadata()
		if err != nil {
			t.Errorf("event metadata: %v", err)
			return
		}
		ev, _, err := cloudevent.Decode(ctx, &nats.Msg{Subject: m.Subject(), Header: m.Headers(), Data: m.Data()})
		if err != nil {
			t.Errorf("decode event: %v", err)
			return
		}
		r.mu.Lock()
		r.all = append(r.all, Recorded{meta.Sequence.Stream, ev})
		r.mu.Unlock()
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cc.Stop)
	return r
}

// Mark is the stream's last sequence now: Since(Mark()) is what comes after.
func (r *Recorder) Mark(t testing.TB) uint64 {
	t.Helper()
	info, err := r.stream.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return info.State.LastSeq
}

// Since returns the recorded events after a mark, in stream order.
func (r *Recorder) Since(mark uint64) []Recorded {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []Recorded
	for _, e := range r.all {
		if e.Seq > mark {
			out = append(out, e)
		}
	}
	return out
}
