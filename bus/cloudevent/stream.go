package cloudevent

import (
	"context"
	"errors"
	"fmt"
	"sync"
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
	s, err := bus.RetryJSFor(ctx, nil, "stream "+StreamName, func(ctx context.Context) (jetstream.Stream, error) {
		return js.CreateOrUpdateStream(ctx, cfg)
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
	// mu orders sends: the stream stores one connection's messages in the order they
	// were sent, and a retry holds it so nothing is sent until the retried events are.
	mu  sync.Mutex
	tap *Tap // hears each event before it is sent (WithTap)
	// refused hears the server refuse a publish of the connection, which no ack
	// answers: waiters for it fail at once instead of at the end of their context.
	refused *refusals
}

// NewPublisher returns a publisher for one host.
func NewPublisher(js jetstream.JetStream, hostID string) *Publisher {
	return &Publisher{js: js, hostID: hostID, refused: refusalsOf(js.Conn())}
}

// ErrPublish wraps a failure to store an event.
var ErrPublish = errors.New("publish event")

// Publish stores events in order: Send, then its wait.
func (p *Publisher) Publish(ctx context.Context, events ...Event) error {
	return p.Send(ctx, events...)(ctx)
}

// Send sends events without waiting for their acks and returns what waits for them
// (a nil error once every one is stored). A caller that sends under its own lock and
// waits after releasing it keeps its events in the order of its changes while the acks
// of several changes are awaited at once: events sent later are stored after these.
//
// The one exception is a stream that fails to store an event (a leader election after
// a node loss): its waiter sends it and the rest of its events again, one at a time,
// holding the publisher so that nothing else is sent meanwhile, but events of later
// Sends already sent then may be stored before them. A message stored before its ack
// was lost is not stored twice (its Nats-Msg-Id).
//
// With a tap (WithTap), its listener hears each event just before it is sent: also
// one the stream then fails to store, as a subscriber of the subject would. wait tells
// it first that the caller waits (Listener.Sent).
func (p *Publisher) Send(ctx context.Context, events ...Event) (wait func(context.Context) error) {
	w := p.send(ctx, events)
	if !p.tap.listening() {
		return w
	}
	return func(ctx context.Context) error {
		p.tap.sent()
		return w(ctx)
	}
}

func (p *Publisher) send(ctx context.Context, events []Event) (wait func(context.Context) error) {
	msgs := make([]*nats.Msg, len(events))
	for i, e := range events {
		msg, err := Encode(ctx, p.hostID, e)
		if err != nil {
			return func(context.Context) error { return err }
		}
		msgs[i] = msg
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.tap.listening() {
		// Before the publish, so that the listener knows the event by its id before
		// its copy from NATS can come.
		for i, msg := range msgs {
			p.tap.hear(msg, events[i])
		}
	}
	refusal := p.refused.watch() // before the publishes, so as to hear their refusals
	futures := make([]jetstream.PubAckFuture, 0, len(msgs))
	for i, msg := range msgs {
		// No retries inside the client: one would resend a later event while an
		// earlier one waits, out of order. publishFrom retries, in order.
		f, err := p.js.PublishMsgAsync(msg, jetstream.WithExpectStream(StreamName), jetstream.WithRetryAttempts(0))
		if err != nil {
			// Too many acks pending, say: the rest one at a time, in order, once the
			// ones sent are stored.
			werr := p.await(ctx, futures, msgs, events, false, refusal)
			if werr == nil {
				werr = p.publishFrom(ctx, msgs, events, i, nil)
			}
			return func(context.Context) error { return werr }
		}
		futures = append(futures, f)
	}
	return func(ctx context.Context) error { return p.await(ctx, futures, msgs, events, true, refusal) }
}

// await waits for the acks of msgs[:len(futures)]; the first failure is retried from
// there in order (publishFrom), under mu unless the caller holds it (lock false). A
// refusal of one of msgs (refusal: taken before they were sent) fails it at once.
func (p *Publisher) await(ctx context.Context, futures []jetstream.PubAckFuture, msgs []*nats.Msg, events []Event, lock bool, refusal <-chan struct{}) error {
	for i := 0; i < len(futures); i++ {
		f := futures[i]
		select {
		case <-refusal:
			refusal = p.refused.watch() // then check: a refusal after the check closes it
			if err := p.refused.of(msgs[i:len(futures)]); err != nil {
				return fmt.Errorf("%w: %w", ErrPublish, err)
			}
			i-- // wait for the same ack again
		case <-f.Ok():
		case err := <-f.Err():
			if lock {
				p.mu.Lock()
				defer p.mu.Unlock()
			}
			return p.publishFrom(ctx, msgs, events, i, err)
		case <-ctx.Done():
			return fmt.Errorf("%w: %w", ErrPublish, ctx.Err())
		}
	}
	return nil
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
			if rerr := p.refused.of(msgs[i : i+1]); rerr != nil {
				err = rerr // the server refused it: it never will take it
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
