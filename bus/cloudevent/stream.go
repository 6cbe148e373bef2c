package cloudevent

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/subject"
)

// StreamName is the JetStream stream of every host's events.
const StreamName = "QUBES_EVENTS"

// StreamConfig are the settings of QUBES_EVENTS a deployment may change.
type StreamConfig struct {
	Replicas int           // 1 embedded, 3 in a cluster
	MaxAge   time.Duration // 0 = 24h
	MaxBytes int64         // 0 = 1 GiB
}

// EnsureStream creates or updates QUBES_EVENTS.
func EnsureStream(ctx context.Context, js jetstream.JetStream, c StreamConfig) (jetstream.Stream, error) {
	if c.Replicas == 0 {
		c.Replicas = 1
	}
	if c.MaxAge == 0 {
		c.MaxAge = 24 * time.Hour
	}
	if c.MaxBytes == 0 {
		c.MaxBytes = 1 << 30
	}
	cfg := jetstream.StreamConfig{
		Name:        StreamName,
		Description: "Qubes Admin API events of every host, as CloudEvents",
		Subjects:    []string{subject.AllEvents()},
		Storage:     jetstream.FileStorage,
		Replicas:    c.Replicas,
		MaxAge:      c.MaxAge,
		MaxBytes:    c.MaxBytes,
		Discard:     jetstream.DiscardOld,
		Duplicates:  2 * time.Minute,
	}
	var s jetstream.Stream
	err := bus.RetryJS(ctx, nil, "stream "+StreamName, func(ctx context.Context) error {
		var err error
		s, err = js.CreateOrUpdateStream(ctx, cfg)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("ensure stream %s: %w", StreamName, err)
	}
	return s, nil
}

// Publisher publishes a host's events and waits for JetStream's ack of each, so a call
// replies only after its events are stored.
type Publisher struct {
	js     jetstream.JetStream
	hostID string
}

// NewPublisher returns a publisher for one host.
func NewPublisher(js jetstream.JetStream, hostID string) *Publisher {
	return &Publisher{js: js, hostID: hostID}
}

// ErrPublish wraps a failure to store an event.
var ErrPublish = errors.New("publish event")

// Publish stores events in order. Publishing is asynchronous with one wait for all
// acks, so a burst of events costs one round trip; order is kept because the stream
// orders messages from one connection as they were sent.
func (p *Publisher) Publish(ctx context.Context, events ...Event) error {
	msgs := make([]*nats.Msg, len(events))
	for i, e := range events {
		msg, err := Encode(ctx, p.hostID, e)
		if err != nil {
			return err
		}
		msgs[i] = msg
	}
	if len(msgs) > 1 {
		futures := make([]jetstream.PubAckFuture, 0, len(msgs))
		for i, msg := range msgs {
			// No retries inside the client: one would resend a later event while an
			// earlier one waits, out of order. publishFrom retries, in order.
			f, err := p.js.PublishMsgAsync(msg, jetstream.WithExpectStream(StreamName), jetstream.WithRetryAttempts(0))
			if err != nil {
				return p.publishFrom(ctx, msgs, events, i, err)
			}
			futures = append(futures, f)
		}
		for i, f := range futures {
			select {
			case <-f.Ok():
			case err := <-f.Err():
				return p.publishFrom(ctx, msgs, events, i, err)
			case <-ctx.Done():
				return fmt.Errorf("%w: %w", ErrPublish, ctx.Err())
			}
		}
		return nil
	}
	return p.publishFrom(ctx, msgs, events, 0, nil)
}

// publishFrom publishes msgs[from:] one at a time, each again while the stream cannot
// answer (a leader election after a node loss) until ctx ends. Events are never
// dropped for such a pause: the service has usually changed something already. A
// message stored before its ack was lost is not stored twice (its Nats-Msg-Id).
func (p *Publisher) publishFrom(ctx context.Context, msgs []*nats.Msg, events []Event, from int, cause error) error {
	if cause != nil && !retryable(cause) {
		return fmt.Errorf("%w %s: %w", ErrPublish, LogName(events[from].Name), cause)
	}
	for i := from; i < len(msgs); i++ {
		backoff := bus.Backoff{Next: 50 * time.Millisecond, Max: time.Second}
		for {
			_, err := p.js.PublishMsg(ctx, msgs[i], jetstream.WithExpectStream(StreamName))
			if err == nil {
				break
			}
			if !retryable(err) || ctx.Err() != nil {
				return fmt.Errorf("%w %s: %w", ErrPublish, LogName(events[i].Name), err)
			}
			if werr := backoff.Wait(ctx); werr != nil {
				return fmt.Errorf("%w %s: %w (last: %w)", ErrPublish, LogName(events[i].Name), werr, err)
			}
		}
	}
	return nil
}

// retryable tells the errors of a stream that is briefly unreachable.
func retryable(err error) bool {
	return errors.Is(err, jetstream.ErrNoStreamResponse) || errors.Is(err, nats.ErrNoResponders) ||
		errors.Is(err, nats.ErrTimeout) || errors.Is(err, context.DeadlineExceeded) ||
		errors.Is(err, nats.ErrConnectionReconnecting) || errors.Is(err, nats.ErrDisconnected) ||
		errors.Is(err, jetstream.ErrAsyncPublishTimeout)
}
