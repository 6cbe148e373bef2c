package bus_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/bustest"
)

// A request made while nobody subscribes waits for a subscriber; with a window, it
// gives up with ErrNoResponders once the window has passed.
func TestRequestWaitsForAResponder(t *testing.T) {
	ns := bustest.RunJetStream(t)
	nc, srv := bustest.Connect(t, ns), bustest.Connect(t, ns)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	if _, err := bus.Request(ctx, nc, nats.NewMsg("nobody"), 100*time.Millisecond); !errors.Is(err, nats.ErrNoResponders) {
		t.Fatalf("past the window: %v, want ErrNoResponders", err)
	}
	done := make(chan error, 1)
	sent := nc.Stats().OutMsgs
	go func() {
		rep, err := bus.Request(ctx, nc, nats.NewMsg("late"), 0)
		if err == nil && string(rep.Data) != "here" {
			err = errors.New("reply " + string(rep.Data))
		}
		done <- err
	}()
	// A second send shows the request found nobody and is waiting; the test cannot
	// watch the subject for it, since a subscriber would be a responder.
	bustest.CheckFor(t, 10*time.Second, time.Millisecond, func() error {
		if n := nc.Stats().OutMsgs - sent; n < 2 {
			return fmt.Errorf("request sent %d times", n)
		}
		return nil
	})
	select {
	case err := <-done:
		t.Fatalf("request ended with nobody subscribed: %v", err)
	default:
	}
	sub, err := srv.Subscribe("late", func(m *nats.Msg) { _ = m.Respond([]byte("here")) })
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := <-done; err != nil {
		t.Fatalf("request once a responder came: %v", err)
	}
}

// With tracing off (no provider installed) a request carries no trace context: the
// message goes out as it was given, without even a header.
func TestRequestUntracedByDefault(t *testing.T) {
	ns := bustest.RunJetStream(t)
	nc, srv := bustest.Connect(t, ns), bustest.Connect(t, ns)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	got := make(chan nats.Header, 1)
	sub, err := srv.Subscribe("plain", func(m *nats.Msg) {
		got <- m.Header
		_ = m.Respond(nil)
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := srv.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := bus.Request(ctx, nc, &nats.Msg{Subject: "plain"}, time.Second); err != nil {
		t.Fatal(err)
	}
	if h := <-got; h != nil {
		t.Errorf("request with tracing off carried a header: %v", h)
	}
}
