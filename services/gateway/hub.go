package gateway

import (
	"context"
	"errors"
	"sync"

	"github.com/qubesbus/qubesbus/bus/cloudevent"
)

// hub reads the host's events once, through one consumer, and fans each frame out to
// every admin.Events subscriber of this gateway: one decode per event, however many
// subscribers. The consumer exists while at least one subscriber does.
type hub struct {
	e      *Events
	mu     sync.Mutex
	subs   map[*subscriber]struct{}
	cancel context.CancelFunc // stops the running feed; nil when none runs
	done   chan struct{}
}

// item is one event frame for subscribers.
type item struct {
	seq   uint64
	vm    string
	frame []byte // shared by every subscriber: never modified
}

// subscriber is one admin.Events connection's queue.
type subscriber struct {
	vm string // "" for dom0: every event
	ch chan item
	// overflow is closed when the subscriber fell a whole buffer behind and lost
	// events; it must be cut off.
	overflow chan struct{}
	once     sync.Once
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
	}
	h.subs[s] = struct{}{}
	return nil
}

// remove unregisters a subscriber; the last one stops the feed (and its consumer).
func (h *hub) remove(s *subscriber) {
	h.mu.Lock()
	delete(h.subs, s)
	var done chan struct{}
	if len(h.subs) == 0 && h.cancel != nil {
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
			nf, rerr := h.e.openFeed(ctx, h.e.host.Events(), f.last+1)
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
		ev, err := cloudevent.DecodeHeaders(msg)
		if err != nil {
			h.e.log.Warn("skipping undecodable event", "subject", msg.Subject, "err", err)
			continue
		}
		it := item{seq: f.last, vm: ev.VM, frame: appendCloudEvent(nil, ev)}
		h.mu.Lock()
		for s := range h.subs {
			if s.vm != "" && s.vm != ev.VM {
				continue
			}
			select {
			case s.ch <- it:
			default:
				s.once.Do(func() { close(s.overflow) })
			}
		}
		h.mu.Unlock()
	}
}

func (h *hub) cutAll() {
	h.mu.Lock()
	defer h.mu.Unlock()
	for s := range h.subs {
		s.once.Do(func() { close(s.overflow) })
	}
}
