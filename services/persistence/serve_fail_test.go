package persistence

import (
	"context"
	"strings"
	"testing"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/schemas/changelog"
)

// A Serve that fails part way (here the change log's follower cannot be created: the
// stream allows one consumer and has one) leaves nothing half-started, so Close after
// it returns instead of stopping what never started (it used to panic), and a later
// Serve may try again.
func TestCloseAfterFailedServe(t *testing.T) {
	ns := bustest.RunJetStream(t)
	nc := bustest.Connect(t, ns)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	st, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: changelog.StreamName,
		Subjects: []string{subject.AllConfig()}, MaxConsumers: 1})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.CreateOrUpdateConsumer(ctx, jetstream.ConsumerConfig{Durable: "taken"}); err != nil {
		t.Fatal(err)
	}
	s, err := New(Config{Host: testHost, DataDir: t.TempDir(), SeedXML: seedXML, Log: quiet})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Serve(ctx, nc); err == nil || !strings.Contains(err.Error(), "follow config log") {
		t.Fatalf("Serve with no consumer left: %v, want the follower's error", err)
	}
	if err := s.Close(ctx); err != nil {
		t.Fatalf("Close after a failed Serve: %v", err)
	}

	if err := st.DeleteConsumer(ctx, "taken"); err != nil {
		t.Fatal(err)
	}
	s2, err := New(Config{Host: testHost, DataDir: t.TempDir(), SeedXML: seedXML, Log: quiet})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s2.Serve(ctx, nc); err != nil {
		t.Fatalf("Serve once a consumer is free: %v", err)
	}
	if err := s2.Close(ctx); err != nil {
		t.Fatal(err)
	}
}
