// Package gateway serves qubesd's Admin API wire protocol on a Unix socket and relays
// each call over NATS to the service that owns it. It adds framing, never meaning: every
// check and every answer comes from the services.
package gateway

import (
	"bytes"
	"errors"
	"strings"

	"github.com/qubesbus/qubesbus/bus/envelope"
	"github.com/qubesbus/qubesbus/bus/qerr"
)

// MaxRequest is the largest request qubesd accepts, header, NUL and payload together.
const MaxRequest = 65536

// ErrFraming marks a request that qubesd drops without a response.
var ErrFraming = errors.New("framing error")

// DecodeRequest parses a complete request (everything the client sent before EOF):
//
//	method[+arg] SP source SP dest-type SP dest NUL payload
//
// The header is split at the first NUL, then on spaces into at most four fields;
// "keyword adminvm" names dom0. Values are not validated here: the services check them
// in qubesd's order.
func DecodeRequest(buf []byte) (*envelope.Request, error) {
	if len(buf) > MaxRequest {
		return nil, errors.New("request too long")
	}
	nul := bytes.IndexByte(buf, 0)
	if nul < 0 {
		return nil, ErrFraming
	}
	fields := strings.SplitN(string(buf[:nul]), " ", 4)
	if len(fields) < 4 {
		return nil, ErrFraming
	}
	dest := fields[3]
	switch {
	case fields[2] == "name":
	case fields[2] == "keyword" && dest == "adminvm":
		dest = "dom0"
	default:
		return nil, ErrFraming
	}
	method, arg, _ := strings.Cut(fields[0], "+")
	return &envelope.Request{Method: method, Arg: arg, Source: fields[1], Dest: dest, Payload: buf[nul+1:]}, nil
}

// Frame type bytes.
var (
	okHeader        = []byte("0\x00")
	eventHeader     = []byte("1\x00")
	exceptionHeader = []byte("2\x00")
)

// AppendOK appends an OK response: "0\0" and the content, no terminator.
func AppendOK(dst, content []byte) []byte {
	return append(append(dst, okHeader...), content...)
}

// AppendException appends an exception response with an empty traceback.
func AppendException(dst []byte, class, msg string) []byte {
	dst = append(dst, exceptionHeader...)
	dst = append(append(dst, class...), 0, 0)
	return append(append(dst, msg...), 0)
}

// AppendEvent appends one event frame: subject ("" for global), event, then key/value
// pairs (kv holds key, value, key, value, …), closed by an empty key.
func AppendEvent(dst []byte, subject, event string, kv ...string) []byte {
	dst = append(dst, eventHeader...)
	dst = append(append(dst, subject...), 0)
	dst = append(append(dst, event...), 0)
	for _, s := range kv {
		dst = append(append(dst, s...), 0)
	}
	return append(dst, 0)
}

// ErrNotAReply marks bytes that are not one OK or exception frame.
var ErrNotAReply = errors.New("not a reply frame")

// ParseReply reads back what AppendOK or AppendException wrote: the reply of a call
// as its client received it.
func ParseReply(b []byte) (envelope.Reply, error) {
	switch {
	case bytes.HasPrefix(b, okHeader):
		return envelope.Reply{Status: envelope.StatusOK, Content: b[len(okHeader):]}, nil
	case bytes.HasPrefix(b, exceptionHeader):
		// class NUL traceback NUL message NUL
		f := bytes.SplitN(b[len(exceptionHeader):], []byte{0}, 3)
		if len(f) != 3 || len(f[0]) == 0 || !bytes.HasSuffix(f[2], []byte{0}) {
			return envelope.Reply{}, ErrNotAReply
		}
		msg := f[2][:len(f[2])-1]
		return envelope.Reply{Status: envelope.StatusException, Exception: qerr.FromWire(string(f[0]), string(msg))}, nil
	}
	return envelope.Reply{}, ErrNotAReply
}
