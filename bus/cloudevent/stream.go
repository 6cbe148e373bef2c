package cloudevent

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"

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
	s, err := js.CreateOrUpdateStream(ctx, cfg)
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
	if len(events) == 1 {
		msg, err := Encode(ctx, p.hostID, events[0])
		if err != nil {
			return err
		}
		if _, err := p.js.PublishMsg(ctx, msg, jetstream.WithExpectStream(StreamName)); err != nil {
			return fmt.Errorf("%w %s: %w", ErrPublish, events[0].Name, err)
		}
		return nil
	}
	futures := make([]jetstream.PubAckFuture, 0, len(events))
	for _, e := range events {
		msg, err := Encode(ctx, p.hostID, e)
		if err != nil {
			return err
		}
		f, err := p.js.PublishMsgAsync(msg, jetstream.WithExpectStream(StreamName))
		if err != nil {
			return fmt.Errorf("%w %s: %w", ErrPublish, e.Name, err)
		}
		futures = append(futures, f)
	}
	for i, f := range futures {
		select {
		case <-f.Ok():
		case err := <-f.Err():
			return fmt.Errorf("%w %s: %w", ErrPublish, events[i].Name, err)
		case <-ctx.Done():
			return fmt.Errorf("%w: %w", ErrPublish, ctx.Err())
		}
	}
	return nil
}
