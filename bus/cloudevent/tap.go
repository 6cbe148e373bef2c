package cloudevent

import (
	"sync"
	"sync/atomic"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Tap lets a reader in the publishers' own process hear one host's events as they are
// sent, before they reach NATS: the gateway's admin.Events relays an event of a service
// of its process without the round trip through the server (a loopback write, the
// server's read and write, the client's read: on a 2-vCPU VM about 90 µs at the
// median and several hundred at the tail). The stream stays the record: a tapped
// event is known by its Nats-Msg-Id, so the reader drops its copies from NATS.
//
// A Tap has at most one listener. The zero Tap is ready; a nil *Tap hears nothing.
type Tap struct {
	mu sync.Mutex // orders Listen and stop
	l  atomic.Pointer[tapListener]
}

type tapListener struct{ heard func(id string, e Event) }

// Listen makes heard the tap's listener, in place of any other, until stop. heard is
// called on the publisher's goroutine, while it holds its order (each Publisher's
// events in the order they are sent): it must not block.
func (t *Tap) Listen(heard func(id string, e Event)) (stop func()) {
	l := &tapListener{heard: heard}
	t.mu.Lock()
	t.l.Store(l)
	t.mu.Unlock()
	return func() {
		t.mu.Lock()
		defer t.mu.Unlock()
		t.l.CompareAndSwap(l, nil)
	}
}

// listening reports whether the tap has a listener: only then are ids read.
func (t *Tap) listening() bool { return t != nil && t.l.Load() != nil }

// hear passes an encoded event to the listener, if any.
func (t *Tap) hear(msg *nats.Msg, e Event) {
	if t == nil {
		return
	}
	if l := t.l.Load(); l != nil {
		if id := msg.Header.Get(jetstream.MsgIDHeader); id != "" {
			l.heard(id, e)
		}
	}
}

// WithTap makes the publisher pass every event it sends to t first. It returns p.
func (p *Publisher) WithTap(t *Tap) *Publisher {
	p.tap = t
	return p
}
