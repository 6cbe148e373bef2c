package audit

import (
	"context"
	"encoding/json"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nuid"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/subject"
)

// PublisherConfig configures a Publisher; zero values take the defaults.
type PublisherConfig struct {
	Host string       // the host id (not escaped): the records' host and subject
	Log  *slog.Logger // nil: discard (then a lost record leaves no trace: give one)
	// Queue is how many records may wait to be sent (default 8192): what absorbs an
	// outage of the stream.
	Queue int
	// MaxInFlight is how many records may be published and not yet acknowledged
	// (default 256).
	MaxInFlight int
	// AckTimeout bounds the wait for one acknowledgement (default 5 s).
	AckTimeout time.Duration
	// RetryFor is how long a record is sent again while the stream does not store it
	// (default 1 min; below the stream's duplicate window, so a resent record is
	// stored once).
	RetryFor time.Duration
}

// Publisher stores audit records on QUBES_AUDIT without making calls wait: Record
// only queues a record; one goroutine publishes the queue asynchronously, at most
// MaxInFlight records awaiting their acks, and sends again what was not acknowledged.
//
// When the stream is unavailable (a leader election, a lost connection, a stream that
// `qubesbus setup` has not created, a user without the right to publish) records are
// resent for RetryFor, while newer ones queue behind them. A record is never dropped
// silently: one that cannot be stored (still unacknowledged after RetryFor, the queue
// full, the publisher closed) is written whole to the log at error level, "audit record
// lost", and counted (Stats). Calls are never refused or slowed for the audit trail's
// sake: an audit failure does not turn into a denial of service of the Admin API.
// Records still queued when the process dies are lost with it (they are normally
// acknowledged within a millisecond).
//
// Records of one publisher are stored in the order they were queued, except that a
// record resent after a failure may land after later ones: order by Time.
type Publisher struct {
	js      jetstream.JetStream
	host    string
	subject string
	log     *slog.Logger
	cfg     PublisherConfig

	mu      sync.Mutex // guards closed and pending
	closed  bool
	pending []queued      // records to send, oldest first; grows on demand (a lab runs
	wake    chan struct{} // thousands of publishers, most with an empty queue)

	closing chan struct{}      // closed by Close: drain the queue, then stop
	abort   context.Context    // ends when Close's context does: give up at once
	cancel  context.CancelFunc //
	done    chan struct{}      // closed when the worker has returned

	stored, lost atomic.Uint64
}

type queued struct {
	msg *nats.Msg
	rec Record
}

// NewPublisher starts a publisher on nc; Close stops it.
func NewPublisher(nc *nats.Conn, cfg PublisherConfig) (*Publisher, error) {
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Queue <= 0 {
		cfg.Queue = 8192
	}
	if cfg.MaxInFlight <= 0 {
		cfg.MaxInFlight = 256
	}
	if cfg.AckTimeout <= 0 {
		cfg.AckTimeout = 5 * time.Second
	}
	if cfg.RetryFor <= 0 {
		cfg.RetryFor = time.Minute
	}
	// A JetStream context of its own: its async acks and limits are the audit's only.
	js, err := jetstream.New(nc, jetstream.WithPublishAsyncMaxPending(cfg.MaxInFlight),
		jetstream.WithPublishAsyncTimeout(cfg.AckTimeout))
	if err != nil {
		return nil, err
	}
	p := &Publisher{js: js, host: cfg.Host, subject: subject.ForHost(cfg.Host).Audit(), log: cfg.Log, cfg: cfg,
		wake: make(chan struct{}, 1), closing: make(chan struct{}), done: make(chan struct{})}
	p.abort, p.cancel = context.WithCancel(context.Background())
	go p.run()
	return p, nil
}

// Record queues a record and returns at once. Host, Time and RequestID are filled in
// when empty.
func (p *Publisher) Record(r Record) {
	if r.Host == "" {
		r.Host = p.host
	}
	if r.Time.IsZero() {
		r.Time = time.Now()
	}
	r.Time = r.Time.UTC()
	if r.RequestID == "" {
		r.RequestID = nuid.Next()
	}
	data, err := json.Marshal(r)
	if err != nil { // cannot happen: every field marshals
		p.lose(r, "encode: "+err.Error())
		return
	}
	msg := nats.NewMsg(p.subject)
	msg.Data = data
	msg.Header.Set(jetstream.MsgIDHeader, r.RequestID)
	msg.Header.Set(jetstream.ExpectedStreamHeader, StreamName)
	p.mu.Lock()
	closed, full := p.closed, len(p.pending) >= p.cfg.Queue
	if !closed && !full {
		p.pending = append(p.pending, queued{msg: msg, rec: r})
	}
	p.mu.Unlock()
	switch {
	case closed:
		p.lose(r, "audit publisher closed")
	case full:
		p.lose(r, "audit queue full")
	default:
		select {
		case p.wake <- struct{}{}:
		default: // the worker is already woken
		}
	}
}

// Stats are the records stored so far and those lost (logged instead).
func (p *Publisher) Stats() (stored, lost uint64) { return p.stored.Load(), p.lost.Load() }

// Close stops taking records and waits until those queued are stored or, if ctx ends
// first, logged as lost.
func (p *Publisher) Close(ctx context.Context) error {
	p.mu.Lock()
	if !p.closed {
		p.closed = true
		close(p.closing)
	}
	p.mu.Unlock()
	select {
	case <-p.done:
		return nil
	case <-ctx.Done():
		p.cancel()
		<-p.done
		return ctx.Err()
	}
}

// lose writes a record that will not be stored to the log, whole.
func (p *Publisher) lose(r Record, reason string) {
	p.lost.Add(1)
	data, _ := json.Marshal(r)
	p.log.Error("audit record lost", "reason", reason, "record", string(data))
}

// run publishes the queue in batches of at most MaxInFlight until Close.
func (p *Publisher) run() {
	defer close(p.done)
	defer p.cancel()
	for {
		p.mu.Lock()
		n := min(len(p.pending), p.cfg.MaxInFlight)
		batch := slices.Clone(p.pending[:n])
		if p.pending = p.pending[n:]; len(p.pending) == 0 {
			p.pending = nil // let a burst's backing array go
		}
		closed := p.closed
		p.mu.Unlock()
		if n > 0 {
			p.send(batch)
			continue
		}
		if closed { // and drained
			return
		}
		select {
		case <-p.wake:
		case <-p.closing:
		}
	}
}

// send publishes a batch and waits for every ack; what failed is sent again, with a
// backoff, for RetryFor.
func (p *Publisher) send(batch []queued) {
	if p.abort.Err() != nil { // Close could wait no longer
		for _, q := range batch {
			p.lose(q.rec, "not sent: stopping")
		}
		return
	}
	deadline := time.Now().Add(p.cfg.RetryFor)
	backoff := bus.Backoff{Next: 100 * time.Millisecond, Max: 2 * time.Second}
	for attempt := 1; ; attempt++ {
		futures := make([]jetstream.PubAckFuture, len(batch))
		var failed []queued
		var lastErr error
		for i, q := range batch {
			// No retries inside the client: this loop resends, with the same message id.
			f, err := p.js.PublishMsgAsync(q.msg, jetstream.WithRetryAttempts(0), jetstream.WithStallWait(p.cfg.AckTimeout))
			if err != nil {
				failed, lastErr = append(failed, q), err
				continue
			}
			futures[i] = f
		}
		for i, f := range futures {
			if f == nil {
				continue
			}
			// Every future ends: with its ack, an error, or the ack timeout.
			select {
			case <-f.Ok():
				p.stored.Add(1)
			case err := <-f.Err():
				failed, lastErr = append(failed, batch[i]), err
			}
		}
		if len(failed) == 0 {
			if attempt > 1 {
				p.log.Info("audit records stored after a retry", "attempts", attempt)
			}
			return
		}
		if p.abort.Err() != nil || backoff.Passes(deadline) {
			for _, q := range failed {
				p.lose(q.rec, "not stored: "+lastErr.Error())
			}
			return
		}
		if attempt == 1 {
			p.log.Warn("audit stream did not store records; retrying", "records", len(failed),
				"for", time.Until(deadline).Round(time.Second), "err", lastErr)
		}
		if err := backoff.Wait(p.abort); err != nil {
			for _, q := range failed {
				p.lose(q.rec, "not stored (stopping): "+lastErr.Error())
			}
			return
		}
		batch = failed
	}
}
