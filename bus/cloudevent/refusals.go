package cloudevent

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
)

// ErrRefused wraps an event the server refused to take from this connection (a
// publish permission it lacks). Nothing acknowledges such a message, so without this
// the caller would wait for the ack until its context ends: for a whole call.
var ErrRefused = errors.New("publish refused by the server")

// refusals are the subjects the server refused a publish on lately, heard on one
// connection's error handler. The server reports every refused message, so a waiter
// woken by signal checks its own subjects.
type refusals struct {
	mu       sync.Mutex
	subjects map[string]refusal
	signal   chan struct{} // closed at the next refusal
}

type refusal struct {
	err error
	at  time.Time
}

// A refusal is kept for refusalMemory, long enough for the waiters it wakes to look,
// and no longer: the server's permissions may be reloaded, and a subject refused
// once allowed since. maxRefused bounds the subjects kept; past it all are forgotten
// (each new refusal is reported again anyway).
const (
	refusalMemory = 30 * time.Second
	maxRefused    = 256
)

// watching holds the refusals of each connection a publisher uses.
var watching sync.Map // *nats.Conn → *refusals

// refusalsOf returns the refusals of nc, hearing them from its error handler (kept
// and called as before) from the first call on, until nc closes.
func refusalsOf(nc *nats.Conn) *refusals {
	if nc == nil {
		return nil
	}
	if r, ok := watching.Load(nc); ok {
		return r.(*refusals)
	}
	r := &refusals{subjects: map[string]refusal{}, signal: make(chan struct{})}
	if prev, loaded := watching.LoadOrStore(nc, r); loaded {
		return prev.(*refusals)
	}
	onErr := nc.ErrorHandler()
	nc.SetErrorHandler(func(c *nats.Conn, s *nats.Subscription, err error) {
		if subj := refusedSubject(err); subj != "" {
			r.refuse(subj, err)
		}
		if onErr != nil {
			onErr(c, s, err)
		}
	})
	onClose := nc.ClosedHandler()
	nc.SetClosedHandler(func(c *nats.Conn) {
		watching.Delete(c)
		if onClose != nil {
			onClose(c)
		}
	})
	return r
}

// refusedSubject is the subject of a refused publish the error reports, or "".
func refusedSubject(err error) string {
	if err == nil || !errors.Is(err, nats.ErrPermissionViolation) {
		return ""
	}
	_, rest, ok := strings.Cut(err.Error(), "Permissions Violation for Publish to \"")
	if !ok {
		return ""
	}
	subj, _, ok := strings.Cut(rest, "\"")
	if !ok {
		return ""
	}
	return subj
}

func (r *refusals) refuse(subj string, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.subjects) >= maxRefused {
		clear(r.subjects)
	}
	r.subjects[subj] = refusal{err, time.Now()}
	close(r.signal)
	r.signal = make(chan struct{})
}

// watch is closed at the next refusal: taken before a publish, it cannot miss that
// publish's.
func (r *refusals) watch() <-chan struct{} {
	if r == nil {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.signal
}

// of reports the refusal of a publish on any of msgs' subjects, nil if none.
func (r *refusals) of(msgs []*nats.Msg) error {
	if r == nil {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.subjects) == 0 {
		return nil
	}
	for _, m := range msgs {
		if rf, ok := r.subjects[m.Subject]; ok && time.Since(rf.at) < refusalMemory {
			return fmt.Errorf("%w: %s: %w", ErrRefused, m.Subject, rf.err)
		}
	}
	return nil
}
