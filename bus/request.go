package bus

import (
	"context"
	"errors"
	"time"

	"github.com/nats-io/nats.go"
)

// Request sends msg and waits for the reply, sending it again while nobody subscribes
// to its subject: an instance taking over from another, or a service whose connection
// is moving to another node. "No responders" means nobody received the message, so
// sending it again is safe even for a change. It gives up with ErrNoResponders once
// window has passed (0: only ctx bounds it).
func Request(ctx context.Context, nc *nats.Conn, msg *nats.Msg, window time.Duration) (*nats.Msg, error) {
	var deadline time.Time
	if window > 0 {
		deadline = time.Now().Add(window)
	}
	backoff := 10 * time.Millisecond
	for {
		rep, err := nc.RequestMsgWithContext(ctx, msg)
		if !errors.Is(err, nats.ErrNoResponders) || (!deadline.IsZero() && time.Now().Add(backoff).After(deadline)) {
			return rep, err
		}
		select {
		case <-time.After(backoff):
		case <-ctx.Done():
			return nil, err
		}
		backoff = min(2*backoff, 500*time.Millisecond)
	}
}
