package gateway

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
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
	// Buffer is how many events the consumer fetches ahead of a slow reader.
	Buffer int
}

// Events serves admin.Events from the QUBES_EVENTS stream.
type Events struct {
	cfg  EventsConfig
	js   jetstream.JetStream
	nc   *nats.Conn
	host subject.Host
	log  *slog.Logger
}

// NewEvents returns the admin.Events handler for a host.
func NewEvents(cfg EventsConfig, nc *nats.Conn, host subject.Host, log *slog.Logger) (*Events, error) {
	if cfg.WriteTimeout == 0 {
		cfg.WriteTimeout = 10 * time.Second
	}
	if cfg.Buffer == 0 {
		cfg.Buffer = 256
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, fmt.Errorf("jetstream: %w", err)
	}
	return &Events{cfg: cfg, js: js, nc: nc, host: host, log: log}, nil
}

var connectionEstablished = AppendEvent(nil, "", "connection-established")

// Serve is the StreamHandler of admin.Events: it runs qubesd's checks (through the
// service that resolves qubes), creates a consumer from the stream's next message
// filtered by destination, and only once the server has confirmed it sends
// connection-established. Every event stored after that is relayed, in stream order,
// until the client goes away; then the consumer is deleted.
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
	filter := e.host.Events()
	if !strings.HasSuffix(string(rep.Content), " AdminVM") {
		filter = e.host.EventsOfFilter(dest)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go watchHangup(ctx, c, cancel)

	// A push consumer delivers only while its deliver subject has interest, so the
	// subscription exists before the consumer does: nothing can be sent into the void.
	// (A pull request can be dropped in a cluster when the server hosting the consumer
	// has not yet seen the interest in its reply subject, and with no acks it would not
	// be sent again.)
	inbox := e.nc.NewInbox()
	sub, err := e.nc.SubscribeSync(inbox)
	if err != nil {
		e.log.Error("admin.Events subscribe", "id", req.ID, "err", err)
		return
	}
	defer sub.Unsubscribe()
	if err := sub.SetPendingLimits(e.cfg.Buffer, e.cfg.Buffer*64*1024); err != nil {
		e.log.Error("admin.Events pending limits", "id", req.ID, "err", err)
		return
	}
	cctx, ccancel := context.WithTimeout(ctx, 10*time.Second)
	// Start at the sequence after the last one the stream leader has acknowledged. In a
	// cluster, DeliverNew is resolved on whichever replica hosts the consumer, and a
	// lagging replica would start too early; the leader's last sequence makes
	// "everything stored after the marker" hold everywhere.
	start, err := e.nextSequence(cctx)
	if err == nil {
		err = e.nc.FlushWithContext(cctx) // the server has our subscription
	}
	var cons jetstream.PushConsumer
	if err == nil {
		cons, err = e.js.CreatePushConsumer(cctx, cloudevent.StreamName, jetstream.ConsumerConfig{
			DeliverSubject:    inbox,
			DeliverPolicy:     jetstream.DeliverByStartSequencePolicy,
			OptStartSeq:       start,
			AckPolicy:         jetstream.AckNonePolicy,
			FilterSubject:     filter,
			InactiveThreshold: time.Minute, // removes it if this gateway dies
			MemoryStorage:     true,
			Replicas:          1,
		})
	}
	ccancel()
	if err != nil {
		e.log.Error("admin.Events consumer", "id", req.ID, "dest", dest, "err", err)
		return
	}
	name := cons.CachedInfo().Name
	defer func() {
		dctx, dcancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer dcancel()
		if err := e.js.DeleteConsumer(dctx, cloudevent.StreamName, name); err != nil && !errors.Is(err, jetstream.ErrConsumerNotFound) {
			e.log.Warn("delete events consumer", "consumer", name, "err", err)
		}
	}()
	if !e.write(c, connectionEstablished) {
		return
	}
	var frame []byte
	for {
		msg, err := sub.NextMsgWithContext(ctx)
		if err != nil {
			if ctx.Err() == nil {
				// Most likely the subscription overflowed its buffer: events were
				// dropped for this client, so it must not go on as if complete.
				e.log.Warn("cutting off an admin.Events subscriber", "id", req.ID, "err", err)
			}
			return
		}
		ev, _, err := cloudevent.Decode(ctx, msg)
		if err != nil {
			e.log.Warn("skipping undecodable event", "subject", msg.Subject, "err", err)
			continue
		}
		frame = appendCloudEvent(frame[:0], ev)
		if !e.write(c, frame) {
			return
		}
	}
}

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
