package gateway

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"

	"github.com/qubesbus/qubesbus/bus/envelope"
	"github.com/qubesbus/qubesbus/bus/subject"
)

// ErrNotRecorded is the outcome of a call a Recording has no reply for.
var ErrNotRecorded = errors.New("no recorded reply")

// Recording is a table of replies prepared in advance, keyed by the request. Served
// with ServeRecording, it is the gateway's own socket handling (accept loop, request
// read, framing, reply frames) with nothing behind it: the floor a load test compares
// the gateway with, so that the difference is what the bus and the services cost.
type Recording struct {
	replies map[callKey]envelope.Reply
}

type callKey struct{ method, arg, source, dest, payload string }

func keyOf(r *envelope.Request) callKey {
	return callKey{r.Method, r.Arg, r.Source, r.Dest, string(r.Payload)}
}

// NewRecording returns an empty table.
func NewRecording() *Recording { return &Recording{replies: map[callKey]envelope.Reply{}} }

// Add records the response a client received for a request, both as on the socket.
func (r *Recording) Add(request, response []byte) error {
	req, err := DecodeRequest(request)
	if err != nil {
		return fmt.Errorf("record request: %w", err)
	}
	rep, err := ParseReply(response)
	if err != nil {
		return fmt.Errorf("record reply to %s: %w", req.Method, err)
	}
	r.replies[keyOf(req)] = rep
	return nil
}

func (r *Recording) answer(_ context.Context, req *envelope.Request) (envelope.Reply, error) {
	rep, ok := r.replies[keyOf(req)]
	if !ok {
		return envelope.Reply{}, fmt.Errorf("%w: %s", ErrNotRecorded, req.Method)
	}
	return rep, nil
}

// ServeRecording answers calls on l from rec until ctx ends; Wait returns once every
// call has ended. rec must not change meanwhile.
func ServeRecording(ctx context.Context, l *net.UnixListener, rec *Recording, log *slog.Logger) *Server {
	s, _ := New(Config{Host: subject.ForHost("recording"), Log: log}) // a valid config
	s.answer = rec.answer
	go func() {
		defer close(s.done)
		if err := s.accept(ctx, l); err != nil {
			s.log.Error("recording stopped", "err", err)
		}
	}()
	return s
}
