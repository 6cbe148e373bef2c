package gateway

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus/cloudevent"
	"github.com/qubesbus/qubesbus/bus/envelope"
	"github.com/qubesbus/qubesbus/bus/subject"
)

// EventsConfig tunes admin.Events streams.
type EventsConfig struct {
	// WriteTimeout cuts off a subscriber that does not read for this long (its socket
	// buffer is full); others are never slowed by it.
	WriteTimeout time.Duration
	// Buffer is how many events may wait for a subscriber whose socket is full before
	// it is cut off (default 16384, a few MB). It must hold the burst a resumed feed
	// delivers after a node loss; a reader that stops altogether is cut off by
	// WriteTimeout instead.
	Buffer int
	// Tap, if set, hears the events the services of this process publish (the host's:
	// see cloudevent.Tap), which are then relayed without waiting for their copy from
	// NATS. Used only where the fast path runs (a server of the gateway's own).
	Tap *cloudevent.Tap
}

// Events serves admin.Events from the QUBES_EVENTS stream.
type Events struct {
	cfg  EventsConfig
	js   jetstream.JetStream
	nc   *nats.Conn
	host subject.Host
	log  *slog.Logger
	hub  *hub
}

// Subscribers is the number of admin.Events subscribers now.
func (e *Events) Subscribers() int { return e.hub.count() }

// Relayed counts the events relayed to subscribers, by where the gateway heard them
// first: the tap (a service of its process, as it sent them), their subject as they
// were published (the fast path), or the stream.
func (e *Events) Relayed() (tapped, published, stored uint64) { return e.hub.relayedCounts() }

// NewEvents returns the admin.Events handler for a host.
func NewEvents(cfg EventsConfig, nc *nats.Conn, host subject.Host, log *slog.Logger) (*Events, error) {
	if cfg.WriteTimeout == 0 {
		cfg.WriteTimeout = 10 * time.Second
	}
	if cfg.Buffer == 0 {
		cfg.Buffer = 16384
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, fmt.Errorf("jetstream: %w", err)
	}
	e := &Events{cfg: cfg, js: js, nc: nc, host: host, log: log}
	e.hub = newHub(e)
	return e, nil
}

var connectionEstablished = AppendEvent(nil, "", "connection-established")

// Serve is the StreamHandler of admin.Events: it runs qubesd's checks (through the
// service that resolves qubes), joins the gateway's event hub (whose consumer the
// server has confirmed), and only then sends connection-established. Every event
// stored after that is relayed, in stream order (only the destination's events for a
// qube other than dom0), until the client goes away.
func (e *Events) Serve(ctx context.Context, c *net.UnixConn, req *envelope.Request, relay func(*envelope.Request) (envelope.Reply, error)) {
	rep, err := relay(req)
	if err != nil {
		e.log.Error("admin.Events check", "id", req.ID, "err", err)
		return
	}
	if rep.Status != envelope.StatusOK {
		writeReply(c, rep, e.log)
		return
	}
	dest, _, _ := strings.Cut(string(rep.Content), " ")
	vm := ""
	if !strings.HasSuffix(string(rep.Content), " AdminVM") {
		vm = dest // qubesd sends a qube's subscriber only that qube's events
	}
	sub, err := newSubscriber(c, vm)
	if err != nil {
		e.log.Error("admin.Events", "id", req.ID, "err", err)
		return
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go watchHangup(ctx, c, cancel)

	// Register first, then take the stream's next sequence: every event stored after
	// that reaches the subscriber, whatever the feed's progress, and earlier ones are
	// dropped (by pump while it drains the queue, by the hub once it writes directly).
	if err := e.hub.add(sub); err != nil {
		e.log.Error("admin.Events consumer", "id", req.ID, "dest", dest, "err", err)
		return
	}
	defer e.hub.remove(sub)
	sctx, scancel := context.WithTimeout(ctx, 10*time.Second)
	start, err := e.nextSequence(sctx)
	scancel()
	if err != nil {
		e.log.Error("admin.Events stream info", "id", req.ID, "err", err)
		return
	}
	if !e.write(c, connectionEstablished) {
		return
	}
	e.pump(ctx, c, sub, start, req.ID)
}

// pump writes the frames queued for the subscriber, from start on, and hands the
// socket to the hub whenever the queue runs dry, until the client goes away or is cut
// off.
func (e *Events) pump(ctx context.Context, c *net.UnixConn, sub *subscriber, start uint64, id string) {
	sub.mu.Lock()
	sub.start = start
	sub.mu.Unlock()
	defer func() {
		// The hub must stop writing before Serve's caller closes the socket.
		cause := sub.cutOff(errClientGone)
		switch {
		case errors.Is(cause, errFellBehind):
			e.log.Warn("cutting off an admin.Events subscriber that fell behind", "id", id, "buffer", e.cfg.Buffer)
		case errors.Is(cause, errWriteTimeout):
			e.log.Warn("cutting off a slow admin.Events subscriber", "id", id, "write_timeout", e.cfg.WriteTimeout)
		default:
			e.log.Debug("admin.Events subscriber done", "id", id, "cause", cause)
		}
	}()
	var batch []byte
	for {
		q, ok := sub.take(e.cfg.WriteTimeout)
		if !ok {
			return
		}
		if q == nil {
			select {
			case <-ctx.Done():
				return
			case <-sub.cut:
				return
			case <-sub.wake:
				continue
			}
		}
		// Whatever is queued goes out in one write: one syscall per burst instead of
		// one per event.
		batch = batch[:0]
		for _, it := range q {
			if it.seq >= start {
				batch = append(batch, it.frame...)
			}
		}
		if len(batch) == 0 {
			continue
		}
		if _, err := c.Write(batch); err != nil {
			if isTimeout(err) {
				err = fmt.Errorf("%w: %w", errWriteTimeout, err)
			}
			sub.cutOff(err) // keeps the cause of a cut-off that ended the write
			return
		}
	}
}

// feed is one push consumer of the events stream and the subscription it delivers to.
type feed struct {
	e    *Events
	sub  *nats.Subscription
	name string
	last uint64 // stream sequence of the last message returned
}

// heartbeat is how often an idle consumer says it is alive; stalled is how long
// without a message or heartbeat means it is gone.
const (
	heartbeat = time.Second
	stalled   = 3 * heartbeat
)

// feedPending is how many events the shared feed may hold before the hub reads them.
const feedPending = 1 << 16

var (
	errFeedStalled  = errors.New("events consumer stalled")
	errWriteTimeout = errors.New("write timeout")
	errClientGone   = errors.New("client gone")
)

// openFeed subscribes, then creates a push consumer that starts at start (0: right
// after the stream leader's last sequence).
//
// A push consumer delivers only while its deliver subject has interest, so the
// subscription exists before the consumer does: nothing can be sent into the void. (A
// pull request can be dropped in a cluster when the server hosting the consumer has not
// yet seen the interest in its reply subject, and with no acks it is never resent.)
// Starting at the leader's last sequence, not DeliverNew, matters in a cluster too:
// DeliverNew is resolved on whichever replica hosts the consumer, and a lagging replica
// would start too early.
func (e *Events) openFeed(ctx context.Context, filter string, start uint64) (*feed, error) {
	inbox := e.nc.NewInbox()
	sub, err := e.nc.SubscribeSync(inbox)
	if err != nil {
		return nil, err
	}
	// A resumed feed delivers its backlog at once (a push consumer has no flow control
	// here): room for a large burst, so that catching up does not overflow it again.
	if err := sub.SetPendingLimits(max(e.cfg.Buffer, feedPending), 64<<20); err != nil {
		sub.Unsubscribe()
		return nil, err
	}
	// Short attempts: while a cluster recovers, resume tries again soon rather than
	// wait out one long request the server may never answer.
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if start == 0 {
		if start, err = e.nextSequence(cctx); err != nil {
			sub.Unsubscribe()
			return nil, err
		}
	}
	if err := e.nc.FlushWithContext(cctx); err != nil { // the server has our subscription
		sub.Unsubscribe()
		return nil, err
	}
	cons, err := e.js.CreatePushConsumer(cctx, cloudevent.StreamName, jetstream.ConsumerConfig{
		DeliverSubject:    inbox,
		DeliverPolicy:     jetstream.DeliverByStartSequencePolicy,
		OptStartSeq:       start,
		AckPolicy:         jetstream.AckNonePolicy,
		FilterSubject:     filter,
		IdleHeartbeat:     heartbeat,
		InactiveThreshold: time.Minute, // removes it if this gateway dies
		MemoryStorage:     true,
		Replicas:          1,
	})
	if err != nil {
		sub.Unsubscribe()
		return nil, err
	}
	return &feed{e: e, sub: sub, name: cons.CachedInfo().Name, last: start - 1}, nil
}

// next returns the next event message, skipping heartbeats and anything at or before
// the last sequence returned.
func (f *feed) next(ctx context.Context) (*nats.Msg, error) {
	for {
		wctx, cancel := context.WithTimeout(ctx, stalled)
		msg, err := f.sub.NextMsgWithContext(wctx)
		cancel()
		if err != nil {
			if ctx.Err() == nil && (errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrSlowConsumer)) {
				// Silence, or a burst larger than the buffer (messages were dropped
				// here, not in the stream): either way resume from the stream.
				return nil, errFeedStalled
			}
			return nil, err
		}
		if len(msg.Data) == 0 && msg.Header.Get("Status") == "100" {
			continue // idle heartbeat
		}
		seq, ok := streamSeq(msg.Reply)
		if !ok {
			return nil, fmt.Errorf("event without stream metadata (reply %q)", msg.Reply)
		}
		if seq <= f.last {
			continue
		}
		f.last = seq
		return msg, nil
	}
}

func (f *feed) close(ctx context.Context) {
	_ = f.sub.Unsubscribe()
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := f.e.js.DeleteConsumer(dctx, cloudevent.StreamName, f.name); err != nil && !errors.Is(err, jetstream.ErrConsumerNotFound) {
		f.e.log.Debug("delete events consumer", "consumer", f.name, "err", err)
	}
}

// streamSeq reads the stream sequence from a JetStream delivery's reply subject:
// $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.… or, with domain and account hash,
// $JS.ACK.<domain>.<hash>.<stream>.<consumer>.<delivered>.<sseq>.…
func streamSeq(reply string) (uint64, bool) {
	t := strings.Split(reply, ".")
	if len(t) < 9 || t[0] != "$JS" || t[1] != "ACK" {
		return 0, false
	}
	i := 5
	if len(t) >= 12 {
		i = 7
	}
	n, err := strconv.ParseUint(t[i], 10, 64)
	return n, err == nil
}

// nextSequence is the sequence the next stored event will get, as the stream leader
// answers it.
func (e *Events) nextSequence(ctx context.Context) (uint64, error) {
	st, err := e.js.Stream(ctx, cloudevent.StreamName)
	if err != nil {
		return 0, err
	}
	return st.CachedInfo().State.LastSeq + 1, nil
}

func appendCloudEvent(dst []byte, ev cloudevent.Event) []byte {
	kv := make([]string, 0, 2*len(ev.Kwargs))
	for _, p := range ev.Kwargs {
		kv = append(kv, p.Key, p.Value)
	}
	return AppendEvent(dst, ev.VM, ev.Name, kv...)
}

// write sends one frame; a client that has not taken it within WriteTimeout is cut off.
func (e *Events) write(c *net.UnixConn, frame []byte) bool {
	_ = c.SetWriteDeadline(time.Now().Add(e.cfg.WriteTimeout))
	if _, err := c.Write(frame); err != nil {
		if errors.Is(err, context.DeadlineExceeded) || isTimeout(err) {
			e.log.Warn("cutting off a slow admin.Events subscriber", "write_timeout", e.cfg.WriteTimeout)
		}
		return false
	}
	return true
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
