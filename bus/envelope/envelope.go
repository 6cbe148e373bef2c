// Package envelope is the request/reply format of an Admin API call on NATS.
//
// Request: the body is the untrusted payload exactly as received; headers carry the
// method, source, destination, argument and request id. Header values are raw client
// bytes, so they are percent-escaped (NATS headers cannot hold CR, LF or NUL).
// Reply: Qubes-Status is ok, exception or abort; an ok body is the exact content the
// gateway writes after "0\0"; an exception carries the class in Qubes-Exception and the
// message in the body.
package envelope

import (
	"errors"
	"fmt"

	"github.com/nats-io/nats.go"

	"github.com/qubesbus/qubesbus/bus/qerr"
)

// Header names.
const (
	HeaderMethod    = "Qubes-Method"
	HeaderSource    = "Qubes-Source"
	HeaderDest      = "Qubes-Dest"
	HeaderArg       = "Qubes-Arg"
	HeaderRequestID = "Qubes-Request-Id"
	HeaderStatus    = "Qubes-Status"
	HeaderException = "Qubes-Exception"
)

// Reply statuses.
const (
	StatusOK        = "ok"
	StatusException = "exception"
	StatusAbort     = "abort"
	// StatusBehind says the instance could not serve the call yet (its replica is
	// behind the caller): nothing was done, so the caller may send it again.
	StatusBehind = "behind"
)

// ErrMalformed marks an envelope that this package cannot have written.
var ErrMalformed = errors.New("envelope: malformed message")

// Request is one Admin API call as the client sent it: every field is raw bytes, not yet
// validated (the service checks them in qubesd's order).
type Request struct {
	Method  string
	Arg     string
	Source  string
	Dest    string
	Payload []byte
	ID      string
	// After are the marks the serving instance must have reached before it answers.
	After Marks
}

// Msg encodes the request for a subject.
func (r *Request) Msg(subject string) *nats.Msg {
	m := nats.NewMsg(subject)
	m.Header.Set(HeaderMethod, escape(r.Method))
	m.Header.Set(HeaderSource, escape(r.Source))
	m.Header.Set(HeaderDest, escape(r.Dest))
	if r.Arg != "" {
		m.Header.Set(HeaderArg, escape(r.Arg))
	}
	if r.ID != "" {
		m.Header.Set(HeaderRequestID, escape(r.ID))
	}
	r.After.Set(m.Header)
	m.Data = r.Payload
	return m
}

// ParseRequest decodes a request written by Msg.
func ParseRequest(h nats.Header, data []byte) (*Request, error) {
	var r Request
	var err error
	fields := []struct {
		name string
		dst  *string
	}{{HeaderMethod, &r.Method}, {HeaderSource, &r.Source}, {HeaderDest, &r.Dest}, {HeaderArg, &r.Arg}, {HeaderRequestID, &r.ID}}
	for _, f := range fields {
		if *f.dst, err = unescape(h.Get(f.name)); err != nil {
			return nil, fmt.Errorf("header %s: %w", f.name, err)
		}
	}
	if r.After, err = ParseMarks(h); err != nil {
		return nil, err
	}
	r.Payload = data
	return &r, nil
}

// Reply is the outcome of a call.
type Reply struct {
	Status    string
	Content   []byte      // StatusOK
	Exception *qerr.Error // StatusException
	// Marks are the state the service was in after the call.
	Marks Marks
}

// OK returns the header and body of a successful reply.
func OK(content []byte) (nats.Header, []byte) {
	h := nats.Header{}
	h.Set(HeaderStatus, StatusOK)
	return h, content
}

// Failure returns the header and body that carry err: a *qerr.Error as an exception,
// anything else (qerr.ErrAbort included) as an abort, as qubesd treats non-Qubes errors.
func Failure(err error) (nats.Header, []byte) {
	rep := Result(nil, err)
	h := nats.Header{}
	h.Set(HeaderStatus, rep.Status)
	if rep.Status == StatusException {
		h.Set(HeaderException, rep.Exception.Class)
		return h, []byte(rep.Exception.Message)
	}
	return h, nil
}

// Result is the reply that carries content (err nil) or err, as ParseReply reads back
// what OK or Failure wrote (marks aside): for a caller in the same process, which
// needs no headers.
func Result(content []byte, err error) Reply {
	if err == nil {
		return Reply{Status: StatusOK, Content: content}
	}
	var qe *qerr.Error
	if errors.As(err, &qe) && !errors.Is(err, qerr.ErrAbort) {
		return Reply{Status: StatusException, Exception: qerr.FromWire(qe.Class, qe.Message)}
	}
	if errors.Is(err, ErrBehind) {
		return Reply{Status: StatusBehind}
	}
	return Reply{Status: StatusAbort}
}

// ErrBehind marks a call refused before anything was done because the instance's
// state is older than the caller's marks; the reply says StatusBehind.
var ErrBehind = errors.New("instance behind the caller")

// ParseReply decodes a reply.
func ParseReply(m *nats.Msg) (Reply, error) {
	marks, err := ParseMarks(m.Header)
	if err != nil {
		return Reply{}, err
	}
	rep, err := parseStatus(m)
	rep.Marks = marks
	return rep, err
}

func parseStatus(m *nats.Msg) (Reply, error) {
	switch st := m.Header.Get(HeaderStatus); st {
	case StatusOK:
		return Reply{Status: st, Content: m.Data}, nil
	case StatusException:
		class := m.Header.Get(HeaderException)
		if class == "" {
			return Reply{}, fmt.Errorf("%w: exception without a class", ErrMalformed)
		}
		return Reply{Status: st, Exception: qerr.FromWire(class, string(m.Data))}, nil
	case StatusAbort, StatusBehind:
		return Reply{Status: st}, nil
	default:
		return Reply{}, fmt.Errorf("%w: status %q", ErrMalformed, st)
	}
}

// Err turns a reply back into a Go error (nil for ok).
func (r Reply) Err() error {
	switch r.Status {
	case StatusOK:
		return nil
	case StatusException:
		return r.Exception
	default:
		return qerr.ErrAbort
	}
}

// escape percent-encodes every byte outside printable ASCII, plus '%' and space, so any
// client bytes survive a NATS header unchanged.
func escape(s string) string {
	n := 0
	for i := 0; i < len(s); i++ {
		if needsEscape(s[i]) {
			n++
		}
	}
	if n == 0 {
		return s
	}
	const hex = "0123456789ABCDEF"
	b := make([]byte, 0, len(s)+2*n)
	for i := 0; i < len(s); i++ {
		c := s[i]
		if needsEscape(c) {
			b = append(b, '%', hex[c>>4], hex[c&0xf])
		} else {
			b = append(b, c)
		}
	}
	return string(b)
}

func needsEscape(c byte) bool { return c <= ' ' || c >= 0x7f || c == '%' }

func unescape(s string) (string, error) {
	i := 0
	for i < len(s) && s[i] != '%' {
		i++
	}
	if i == len(s) {
		return s, nil
	}
	b := make([]byte, 0, len(s))
	b = append(b, s[:i]...)
	for ; i < len(s); i++ {
		if s[i] != '%' {
			b = append(b, s[i])
			continue
		}
		if i+2 >= len(s) {
			return "", fmt.Errorf("%w: short escape", ErrMalformed)
		}
		hi, lo := unhex(s[i+1]), unhex(s[i+2])
		if hi < 0 || lo < 0 {
			return "", fmt.Errorf("%w: bad escape", ErrMalformed)
		}
		b = append(b, byte(hi<<4|lo))
		i += 2
	}
	return string(b), nil
}

func unhex(c byte) int {
	switch {
	case '0' <= c && c <= '9':
		return int(c - '0')
	case 'A' <= c && c <= 'F':
		return int(c - 'A' + 10)
	}
	return -1
}
