package bus

import (
	"context"
	"errors"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/qubesbus/qubesbus/bus/tracing"
)

// Request sends msg and waits for the reply, sending it again while nobody subscribes
// to its subject: an instance taking over from another, or a service whose connection
// is moving to another node. "No responders" means nobody received the message, so
// sending it again is safe even for a change. It gives up with ErrNoResponders once
// window has passed (0: only ctx bounds it). With tracing on, the request is a client
// span, and its trace context travels in msg's header.
func Request(ctx context.Context, nc *nats.Conn, msg *nats.Msg, window time.Duration) (*nats.Msg, error) {
	ctx, span := tracing.StartClient(ctx, msg)
	defer span.End()
	rep, err := request(ctx, nc, msg, window)
	tracing.Fail(span, err)
	return rep, err
}

func request(ctx context.Context, nc *nats.Conn, msg *nats.Msg, window time.Duration) (*nats.Msg, error) {
	var deadline time.Time
	if window > 0 {
		deadline = time.Now().Add(window)
	}
	backoff := Backoff{Next: 10 * time.Millisecond, Max: 500 * time.Millisecond}
	for {
		rep, err := nc.RequestMsgWithContext(ctx, msg)
		if !errors.Is(err, nats.ErrNoResponders) || backoff.Passes(deadline) {
			return rep, err
		}
		if backoff.Wait(ctx) != nil {
			return nil, err
		}
	}
}
