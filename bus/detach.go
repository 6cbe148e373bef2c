package bus

import (
	"encoding/json"
	"errors"
	"fmt"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
)

// Detach returns a request that may be answered after the micro handler that received
// r has returned, from another goroutine. micro's own request must not be: right after
// the handler returns, micro reads the request's error state to count errors, and an
// answer from another goroutine writes it (a data race that go test -race reports). The
// detached request answers on nc, to r's reply subject, exactly as micro would; micro's
// error count then misses its errors.
func Detach(nc *nats.Conn, r micro.Request) micro.Request {
	return &detached{nc: nc, subject: r.Subject(), reply: r.Reply(), data: r.Data(), headers: r.Headers()}
}

type detached struct {
	nc             *nats.Conn
	subject, reply string
	data           []byte
	headers        micro.Headers
}

func (d *detached) Data() []byte           { return d.data }
func (d *detached) Headers() micro.Headers { return d.headers }
func (d *detached) Subject() string        { return d.subject }
func (d *detached) Reply() string          { return d.reply }

func (d *detached) Respond(data []byte, opts ...micro.RespondOpt) error {
	msg := &nats.Msg{Data: data}
	for _, opt := range opts {
		opt(msg)
	}
	return d.send(msg)
}

func (d *detached) RespondJSON(v any, opts ...micro.RespondOpt) error {
	b, err := json.Marshal(v)
	if err != nil {
		return micro.ErrMarshalResponse
	}
	return d.Respond(b, opts...)
}

func (d *detached) Error(code, description string, data []byte, opts ...micro.RespondOpt) error {
	if code == "" || description == "" {
		return fmt.Errorf("%w: error code and description", micro.ErrArgRequired)
	}
	msg := &nats.Msg{Data: data, Header: nats.Header{
		micro.ErrorHeader:     []string{description},
		micro.ErrorCodeHeader: []string{code},
	}}
	for _, opt := range opts {
		opt(msg)
	}
	return d.send(msg)
}

func (d *detached) send(msg *nats.Msg) error {
	if d.reply == "" {
		return fmt.Errorf("%w: %w", micro.ErrRespond, errors.New("request has no reply subject"))
	}
	msg.Subject = d.reply
	if err := d.nc.PublishMsg(msg); err != nil {
		return fmt.Errorf("%w: %w", micro.ErrRespond, err)
	}
	return nil
}
