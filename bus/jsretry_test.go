package bus_test

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus"
)

// A cluster that is still electing answers "temporarily unavailable" or nothing at
// all; start-up retries those and gives up at once on anything else.
func TestRetryJSRetriesOnlyWhatAClusterSaysIsTransient(t *testing.T) {
	ctx := context.Background()
	notAvail := &jetstream.APIError{Code: 503, ErrorCode: 10008, Description: "JetStream system temporarily unavailable"}
	transient := []error{
		fmt.Errorf("create: %w", context.DeadlineExceeded),
		nats.ErrTimeout,
		nats.ErrNoResponders,
		fmt.Errorf("create: %w", notAvail),
	}
	for _, e := range transient {
		if !bus.TransientJS(ctx, e) {
			t.Errorf("%v: not transient", e)
		}
	}
	for _, e := range []error{nil, jetstream.ErrStreamNameAlreadyInUse, jetstream.ErrJetStreamNotEnabled,
		&jetstream.APIError{Code: 400, ErrorCode: 10058, Description: "stream name already in use"}} {
		if bus.TransientJS(ctx, e) {
			t.Errorf("%v: transient", e)
		}
	}

	calls := 0
	err := bus.RetryJS(ctx, nil, "test", func(context.Context) error {
		calls++
		if calls <= len(transient) {
			return transient[calls-1]
		}
		return nil
	})
	if err != nil || calls != len(transient)+1 {
		t.Fatalf("after %d transient errors: err %v after %d calls", len(transient), err, calls)
	}

	calls = 0
	err = bus.RetryJS(ctx, nil, "test", func(context.Context) error { calls++; return jetstream.ErrStreamNameAlreadyInUse })
	if !errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) || calls != 1 {
		t.Fatalf("a lasting error: err %v after %d calls, want it at once", err, calls)
	}

	// Once the caller's context ends, no error is transient: the loop stops.
	cctx, cancel := context.WithCancel(ctx)
	err = bus.RetryJS(cctx, nil, "test", func(context.Context) error { cancel(); return nats.ErrTimeout })
	if !errors.Is(err, nats.ErrTimeout) {
		t.Fatalf("ended context: %v", err)
	}
}
