package gateway

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"syscall"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/sys/unix"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/cloudevent"
)

// hub reads the host's events once, through one consumer, and fans each frame out to
// every admin.Events subscriber of this gateway: one decode per event, however many
// subscribers. The consumer exists while at least one subscriber does.
//
// The consumer (the feed) is the record: it relays every event the stream stores, in
// the stream's order, so none is lost. But a stored event reaches a consumer several
// goroutine hand-offs after it was published (the stream's loop, the consumer's loop,
// the stream's loop again), each a wake-up of an idle CPU: on a 2-vCPU VM about 300 µs
// from publish to the hub, against about 110 µs for a plain subscriber of the subject.
// So the hub also subscribes to the host's event subject (the fast path) and relays
// what it hears there at once, keyed by its Nats-Msg-Id; when the feed brings that
// event, the subscribers that had it are skipped. Anything the fast path misses (a
// reconnect, a slow consumer, a role without that permission) the feed relays. Events
// of one publisher keep their order either way; events of two publishers at the same
// moment may reach subscribers in another order than the stream's.
//
// The services of the gateway's own process (one `qubesbus run`) are heard sooner
// still, through the tap (EventsConfig.Tap): as they send an event, before it reaches
// NATS. Such an event is relayed like one of the fast path, and its copy from the
// subject is dropped by its id without being decoded.
type hub struct {
	e      *Events
	mu     sync.Mutex
	subs   map[*subscriber]struct{}
	cancel context.CancelFunc // stops the running feed; nil when none runs
	done   chan struct{}

	fast       *fastPath             // nil when none runs
	ahead      map[string]aheadEvent // events relayed by the fast path, not yet by the feed
	aheadN     uint64                // counts the events relayed by the fast path
	tappedN    uint64                // those of aheadN the tap heard
	lastJoined uint64                // the joined of the subscriber added last
	relayed    idRing                // the feed's latest events: a late fast copy is dropped
	stored     uint64                // counts the events the feed relayed to anyone
	// The fast path relays at once only while it is known to have missed nothing
	// (fastOK): since okEpoch no reconnect or dropped message, and the feed has
	// brought nothing it had not heard. Otherwise what it hears waits in held for the
	// feed, in the stream's order, until the feed brings an event it heard in the
	// current epoch with nothing else held: then the two agree again.
	fastOK  bool
	okEpoch uint64
	held    map[string]heldEvent
	// awaiting is the event whose copy from the fast path the feed waits for, having
	// brought it first (fromFeed): any other event the fast path hears meanwhile came
	// after it, so the fast path is no longer trusted.
	awaiting  string
	lastPrune time.Time
}

// item is one event frame for subscribers.
type item struct {
	seq   uint64
	vm    string
	frame []byte // shared by every subscriber: never modified
}

// Why a subscriber is cut off.
var (
	errFellBehind = errors.New("fell a whole buffer behind")
	errFeedEnded  = errors.New("events feed ended")
)

// subscriber is one admin.Events connection.
//
// Once it has caught up, the hub writes each frame straight into its socket with a
// non-blocking write: one syscall on the hub's goroutine, with no goroutine to wake and
// no write deadline to arm. Only when the socket buffer is full (or before the
// subscriber has sent connection-established) do frames go to its queue, which its
// own goroutine (pump) writes with the write timeout; once the queue is empty the
// socket is handed back to the hub. Exactly one side writes at any time, in order.
type subscriber struct {
	vm     string // "" for dom0: every event
	c      *net.UnixConn
	rc     syscall.RawConn
	joined uint64 // hub.aheadN when it was added: it has every fast event after that

	mu     sync.Mutex
	direct bool   // the hub writes to the socket; queue is empty
	start  uint64 // first sequence relayed (set before direct)
	queue  []item // frames for pump, in order
	spare  []item // the queue's other buffer, to swap without allocating
	wake   chan struct{}
	// cut is closed, with cause set, when the subscriber must be cut off: it fell a
	// whole buffer behind and lost events, its socket failed, or the feed ended.
	cut   chan struct{}
	cause error

	// The direct write's arguments and results, so that rc.Control gets a function
	// value made once per subscriber instead of a closure per frame.
	wbuf    []byte
	wn      int
	werr    error
	writeFn func(fd uintptr)
}

func newSubscriber(c *net.UnixConn, vm string) (*subscriber, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("admin.Events socket: %w", err)
	}
	s := &subscriber{vm: vm, c: c, rc: rc, wake: make(chan struct{}, 1), cut: make(chan struct{})}
	s.writeFn = s.writeFd
	return s, nil
}

// writeFd writes as much of wbuf as the socket takes now. The descriptor is
// non-blocking (the runtime's poller owns it): a full buffer is EAGAIN, not a wait.
func (s *subscriber) writeFd(fd uintptr) {
	s.wn, s.werr = 0, nil
	for s.wn < len(s.wbuf) {
		n, err := unix.Write(int(fd), s.wbuf[s.wn:])
		if err == unix.EINTR {
			continue
		}
		if err == unix.EAGAIN {
			return
		}
		if err != nil {
			s.werr = err
			return
		}
		s.wn += n
	}
}

// offer hands the subscriber one frame: written at once if the socket takes it,
// queued for pump otherwise. The caller holds the hub's lock, so the subscriber is
// registered and its connection open.
func (s *subscriber) offer(it item, limit int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cause != nil {
		return
	}
	if s.direct {
		if it.seq < s.start {
			return
		}
		s.wbuf = it.frame
		err := s.rc.Control(s.writeFn)
		s.wbuf = nil
		if err == nil {
			err = s.werr
		}
		if err != nil {
			s.cutLocked(fmt.Errorf("write: %w", err))
			return
		}
		if s.wn == len(it.frame) {
			return
		}
		// The socket buffer is full: pump finishes this frame, with the timeout.
		s.direct = false
		it.frame = it.frame[s.wn:]
	}
	if len(s.queue) >= limit {
		s.cutLocked(errFellBehind)
		return
	}
	s.queue = append(s.queue, it)
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// take returns the queued frames and arms the write deadline for them; or none after
// handing the socket to the hub (the queue was empty); ok is false once the subscriber
// is cut off. The slice is valid until the next take.
func (s *subscriber) take(timeout time.Duration) (q []item, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cause != nil {
		return nil, false
	}
	q = s.queue
	if len(q) == 0 {
		s.direct = true
		return nil, true
	}
	clear(s.spare[:cap(s.spare)]) // drop the frames written last time
	s.queue, s.spare = s.spare[:0], q
	// Armed under the lock, so that a cut-off cannot come between: see cutLocked.
	_ = s.c.SetWriteDeadline(time.Now().Add(timeout))
	return q, true
}

// cutOff cuts the subscriber off unless it already is, and returns the cause that
// holds.
func (s *subscriber) cutOff(cause error) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.cutLocked(cause)
	return s.cause
}

func (s *subscriber) cutLocked(cause error) {
	if s.cause == nil {
		s.cause = cause
		s.direct = false
		close(s.cut)
		// A pump blocked writing to a client that stopped reading gives up now, not
		// after the write timeout. (The hub's direct writes ignore deadlines.)
		_ = s.c.SetWriteDeadline(time.Unix(1, 0))
	}
}

func newHub(e *Events) *hub { return &hub{e: e, subs: map[*subscriber]struct{}{}} }

// add registers a subscriber and makes sure the feed runs. Frames are queued from now
// on; the subscriber drops those before its start sequence.
func (h *hub) add(s *subscriber) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.cancel == nil {
		ctx, cancel := context.WithCancel(context.Background())
		// The feed starts after the stream's last event: every subscriber's start
		// sequence, taken after it was added, is at or after the feed's.
		f, err := h.e.openFeed(ctx, h.e.host.Events(), 0)
		if err != nil {
			cancel()
			return err
		}
		h.cancel, h.done = cancel, make(chan struct{})
		go h.run(ctx, f, h.done)
		h.startFast()
	}
	s.joined, h.lastJoined = h.aheadN, h.aheadN
	h.subs[s] = struct{}{}
	return nil
}

// count is the number of subscribers.
func (h *hub) count() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.subs)
}

// remove unregisters a subscriber; the last one stops the feed (and its consumer).
func (h *hub) remove(s *subscriber) {
	h.mu.Lock()
	delete(h.subs, s)
	var done chan struct{}
	if len(h.subs) == 0 && h.cancel != nil {
		h.stopFastLocked()
		h.cancel()
		done = h.done
		h.cancel, h.done = nil, nil
	}
	h.mu.Unlock()
	if done != nil {
		<-done // the consumer is deleted before remove returns
	}
}

func (h *hub) run(ctx context.Context, f *feed, done chan struct{}) {
	defer close(done)
	defer func() { f.close(context.WithoutCancel(ctx)) }()
	for {
		msg, err := f.next(ctx)
		if errors.Is(err, errFeedStalled) {
			// The server hosting the consumer died or lost it, or a burst overflowed
			// the buffer: a new consumer resumes right after the last event relayed,
			// so nothing is lost or repeated.
			h.e.log.Warn("admin.Events consumer stalled; resuming", "after", f.last)
			nf, rerr := h.resume(ctx, f.last+1)
			if rerr != nil {
				h.e.log.Error("admin.Events resume; cutting off subscribers", "err", rerr)
				h.cutAll()
				return
			}
			f.close(ctx)
			f = nf
			continue
		}
		if err != nil {
			if ctx.Err() == nil {
				h.e.log.Error("admin.Events feed ended; cutting off subscribers", "err", err)
				h.cutAll()
			}
			return
		}
		fe := h.fromFeed(msg.Header.Get(jetstream.MsgIDHeader))
		if fe.skip {
			continue // every subscriber had it: no need to decode it again
		}
		ev, err := cloudevent.DecodeHeaders(msg)
		if err != nil {
			h.e.log.Warn("skipping undecodable event", "subject", msg.Subject, "err", err)
			continue
		}
		h.deliverStored(fe, item{seq: f.last, vm: ev.VM, frame: appendCloudEvent(nil, ev)})
	}
}

// resumeWindow is how long the hub keeps trying to resume its feed before it cuts its
// subscribers off. While a cluster recovers from a node loss, JetStream may not create
// consumers for several seconds; the stream keeps the events meanwhile, so a late
// resume loses nothing: subscribers only wait.
const resumeWindow = time.Minute

// resume opens a feed starting at start, trying again until resumeWindow has passed.
func (h *hub) resume(ctx context.Context, start uint64) (*feed, error) {
	deadline := time.Now().Add(resumeWindow)
	backoff := bus.Backoff{Next: 100 * time.Millisecond, Max: 2 * time.Second}
	for {
		f, err := h.e.openFeed(ctx, h.e.host.Events(), start)
		if err == nil || ctx.Err() != nil || backoff.Passes(deadline) {
			return f, err
		}
		h.e.log.Warn("admin.Events resume failed; trying again", "after", start-1, "err", err)
		if err := backoff.Wait(ctx); err != nil {
			return nil, err
		}
	}
}

// deliverLocked relays one frame to every subscriber it is for, but those that joined
// before the fast path's event gotAhead (0: none), which had it.
func (h *hub) deliverLocked(it item, gotAhead uint64) (offered bool) {
	for s := range h.subs {
		if s.joined < gotAhead {
			continue
		}
		if s.vm == "" || s.vm == it.vm {
			s.offer(it, h.e.cfg.Buffer)
			offered = true
		}
	}
	return offered
}

func (h *hub) cutAll() {
	h.mu.Lock()
	defer h.mu.Unlock()
	for s := range h.subs {
		s.cutOff(errFeedEnded)
	}
}
