// Package cloudevent carries Qubes events on NATS as CloudEvents (binary mode: ce-*
// headers, JSON data) and publishes them to the QUBES_EVENTS JetStream stream.
//
// A Qubes event has a subject (the qube, or none for global events), a wire name such
// as "property-set:netvm", and ordered keyword arguments. The CloudEvent type is
// "org.qubes-os.<wire name>", source "/qubes/<host>", subject the qube name, data a JSON
// object of the keyword arguments in their order, and the extension "qubesevent" holds
// the exact wire name.
//
// A client chooses tag and feature names (any ASCII but space and NUL, up to the
// gateway's 64 KiB request), so an event's names may not fit a header: an event whose
// qube or wire name is not header-safe (HeaderSafe) is published in structured mode
// instead (the whole CloudEvent as JSON in the payload, content-type
// application/cloudevents+json), with its type shortened to TypePrefix + base + ":" +
// the suffix's subject token. Decode and DecodeHeaders read both modes; the exact
// names are always in ce-subject and the qubesevent extension, never taken from the
// NATS subject (whose tokens are bounded and may be hashed: subject.Token).
package cloudevent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	cejs "github.com/cloudevents/sdk-go/protocol/nats_jetstream/v2"
	ce "github.com/cloudevents/sdk-go/v2"
	"github.com/cloudevents/sdk-go/v2/binding"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nuid"

	"github.com/qubesbus/qubesbus/bus/subject"
)

// TypePrefix starts every qubesbus CloudEvent type.
const TypePrefix = "org.qubes-os."

// ExtensionName is the CloudEvent extension that holds the wire event name.
const ExtensionName = "qubesevent"

// StructuredContentType is the content-type header of an event in structured mode.
const StructuredContentType = "application/cloudevents+json"

// contentTypeHeader is the header the CloudEvents NATS binding reads the content type
// from.
const contentTypeHeader = "content-type"

// MaxHeaderName is the longest qube or wire name an event carries in its headers.
// JetStream refuses a message whose headers exceed 64 KiB
// (JSStreamHeaderExceedsMaximumErr) and a binary-mode event holds its wire name twice
// (ce-type, ce-qubesevent), so a name of the gateway's 64 KiB could not be stored;
// 1 KiB keeps an event's headers a few KiB at most. Headers are not bound by NATS's
// max_control_line (only "HPUB <subject> <reply> <hdr size> <total size>" is).
const MaxHeaderName = 1024

// HeaderSafe reports whether a qube or wire name travels exactly in a header: at most
// MaxHeaderName bytes, each printable ASCII and not a space (nats.go trims a header
// value's leading and trailing white space and turns CR and LF into spaces).
func HeaderSafe(name string) bool {
	if len(name) > MaxHeaderName {
		return false
	}
	for i := 0; i < len(name); i++ {
		if name[i] <= ' ' || name[i] >= 0x7f {
			return false
		}
	}
	return true
}

// KV is one keyword argument, already rendered as qubesd renders it.
type KV struct {
	Key   string
	Value string
}

// Event is one Qubes event.
type Event struct {
	VM     string // qube name; "" for a global event
	Name   string // wire name, e.g. "domain-start" or "property-set:netvm"
	Kwargs []KV
}

// New builds an event; kv alternates keys and values.
func New(vm, name string, kv ...string) Event {
	e := Event{VM: vm, Name: name}
	for i := 0; i+1 < len(kv); i += 2 {
		e.Kwargs = append(e.Kwargs, KV{kv[i], kv[i+1]})
	}
	return e
}

// Get returns the value of a keyword argument.
func (e Event) Get(key string) (string, bool) {
	for _, kv := range e.Kwargs {
		if kv.Key == key {
			return kv.Value, true
		}
	}
	return "", false
}

// Source is the CloudEvent source of a host.
func Source(hostID string) string { return "/qubes/" + hostID }

// HostOf is the host of an event, from its source.
func HostOf(ev *ce.Event) string { return strings.TrimPrefix(ev.Source(), "/qubes/") }

// Encode turns an event into a NATS message for its subject on a host: binary mode
// (ce-* headers), or structured mode when a name is not HeaderSafe.
func Encode(ctx context.Context, hostID string, e Event) (*nats.Msg, error) {
	if HeaderSafe(e.VM) && HeaderSafe(e.Name) && plainHostID(hostID) {
		return encodeBinary(hostID, e, nuid.Next(), time.Now()), nil
	}
	return encodeSDK(ctx, hostID, e, nuid.Next(), time.Now())
}

// encodeSDK encodes through the CloudEvents SDK: structured mode, and a host ID that
// the SDK must check as a URI.
func encodeSDK(ctx context.Context, hostID string, e Event, id string, t time.Time) (*nats.Msg, error) {
	structured := !HeaderSafe(e.VM) || !HeaderSafe(e.Name)
	ev := ce.NewEvent()
	ev.SetID(id)
	ev.SetSource(Source(hostID))
	if structured {
		ev.SetType(TypePrefix + boundedName(e.Name))
	} else {
		ev.SetType(TypePrefix + e.Name)
	}
	ev.SetTime(t)
	if e.VM != "" {
		ev.SetSubject(e.VM)
	}
	ev.SetExtension(ExtensionName, e.Name)
	if err := ev.SetData(ce.ApplicationJSON, json.RawMessage(orderedJSON(e.Kwargs))); err != nil {
		return nil, fmt.Errorf("event data: %w", err)
	}
	if err := ev.Validate(); err != nil {
		return nil, fmt.Errorf("invalid cloudevent %s: %w", LogName(e.Name), err)
	}
	var body bytes.Buffer
	wctx := ctx
	if structured {
		wctx = binding.WithForceStructured(ctx)
	}
	h, err := cejs.WriteMsg(wctx, binding.ToMessage(&ev), &body)
	if err != nil {
		return nil, fmt.Errorf("encode cloudevent: %w", err)
	}
	msg := nats.NewMsg(subject.ForHost(hostID).Event(e.VM, e.Name))
	for k, v := range h {
		msg.Header[k] = v
	}
	if structured {
		msg.Header.Set(contentTypeHeader, StructuredContentType)
	}
	// The stream drops a second copy of the same event, so a publish whose ack was
	// lost can be sent again.
	msg.Header.Set(jetstream.MsgIDHeader, ev.ID())
	msg.Data = body.Bytes()
	return msg, nil
}

// Binary-mode header names, as the CloudEvents NATS binding writes them (ce- and the
// attribute's name, in lower case: NATS headers are not canonicalised).
const (
	hdrSpecVersion = "ce-specversion"
	hdrID          = "ce-id"
	hdrSource      = "ce-source"
	hdrType        = "ce-type"
	hdrTime        = "ce-time"
	hdrSubject     = "ce-subject"
	hdrDataType    = "ce-datacontenttype"
	hdrQubesEvent  = "ce-" + ExtensionName
)

// plainHostID reports whether "/qubes/<id>" is a URI reference the SDK would accept
// as is, so that encodeBinary need not parse it: letters, digits, '-', '_' and '.'.
func plainHostID(id string) bool {
	if id == "" {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '_' || c == '.') {
			return false
		}
	}
	return true
}

// encodeBinary writes the message the SDK writes for a binary-mode event (the same
// headers, values and data; TestEncodeBinaryMatchesTheSDK holds it to that) without
// building an SDK event: that cost about 90 allocations and a URL parse per event,
// a fifth of a feature.Set's. The names must be HeaderSafe and the host ID plain.
func encodeBinary(hostID string, e Event, id string, t time.Time) *nats.Msg {
	n := 8
	if e.VM != "" {
		n++
	}
	// One backing array for every header's one value.
	vals := make([]string, 0, n)
	h := make(nats.Header, n)
	set := func(k, v string) {
		vals = append(vals, v)
		h[k] = vals[len(vals)-1 : len(vals) : len(vals)]
	}
	set(hdrSpecVersion, ce.VersionV1)
	set(hdrID, id)
	set(hdrSource, Source(hostID))
	set(hdrType, TypePrefix+e.Name)
	set(hdrTime, t.Format(time.RFC3339Nano)) // in t's zone, as the SDK's binary writer
	if e.VM != "" {
		set(hdrSubject, e.VM)
	}
	set(hdrDataType, ce.ApplicationJSON)
	set(hdrQubesEvent, e.Name)
	// The stream drops a second copy of the same event, so a publish whose ack was
	// lost can be sent again.
	set(jetstream.MsgIDHeader, id)
	return &nats.Msg{Subject: subject.ForHost(hostID).Event(e.VM, e.Name), Header: h, Data: orderedJSON(e.Kwargs)}
}

// boundedName is a wire name with its suffix as its subject token: the type of an
// event in structured mode, short and printable whatever the names.
func boundedName(name string) string {
	base, suffix, found := strings.Cut(name, ":")
	if !found {
		return subject.Token(base)
	}
	return subject.Token(base) + ":" + subject.Token(suffix)
}

// LogName is a name fit for a log line or an error: a long one is cut, with its length.
func LogName(name string) string {
	const keep = 96
	if len(name) <= keep {
		return name
	}
	return fmt.Sprintf("%s…(%d bytes)", name[:keep], len(name))
}

// ErrNotQubesEvent marks a message that is not a qubesbus CloudEvent.
var ErrNotQubesEvent = errors.New("not a qubes cloudevent")

// Decode reads an event back from a NATS message with the CloudEvents SDK.
func Decode(ctx context.Context, msg *nats.Msg) (Event, *ce.Event, error) {
	ev, err := binding.ToEvent(ctx, cejs.NewMessage(msg))
	if err != nil {
		return Event{}, nil, fmt.Errorf("%w: %w", ErrNotQubesEvent, err)
	}
	name, _ := ev.Extensions()[ExtensionName].(string)
	if name == "" || !strings.HasPrefix(ev.Type(), TypePrefix) {
		return Event{}, nil, fmt.Errorf("%w: type %q", ErrNotQubesEvent, ev.Type())
	}
	kw, err := parseOrderedJSON(ev.Data())
	if err != nil {
		return Event{}, nil, fmt.Errorf("%w: data: %w", ErrNotQubesEvent, err)
	}
	return Event{VM: ev.Subject(), Name: name, Kwargs: kw}, ev, nil
}

// orderedJSON writes kwargs as a JSON object, keys in their order, each string as
// json.Marshal writes it.
func orderedJSON(kw []KV) []byte {
	size := 2
	for _, kv := range kw {
		size += len(kv.Key) + len(kv.Value) + 6
	}
	b := make([]byte, 0, size)
	b = append(b, '{')
	for i, kv := range kw {
		if i > 0 {
			b = append(b, ',')
		}
		b = appendJSONString(b, kv.Key)
		b = append(b, ':')
		b = appendJSONString(b, kv.Value)
	}
	return append(b, '}')
}

// appendJSONString appends s quoted as json.Marshal quotes it. Printable ASCII that
// needs no escape (most names and values) is copied; anything else goes through
// json.Marshal, whose escapes (HTML characters, control characters, invalid UTF-8,
// U+2028) are the format's.
func appendJSONString(b []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c >= 0x7f || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' {
			q, _ := json.Marshal(s)
			return append(b, q...)
		}
	}
	b = append(b, '"')
	b = append(b, s...)
	return append(b, '"')
}

// parseOrderedJSON reads a flat JSON object of strings keeping key order.
func parseOrderedJSON(data []byte) ([]KV, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	tok, err := dec.Token()
	if err != nil {
		return nil, err
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return nil, errors.New("not an object")
	}
	var out []KV
	for dec.More() {
		kt, err := dec.Token()
		if err != nil {
			return nil, err
		}
		vt, err := dec.Token()
		if err != nil {
			return nil, err
		}
		k, _ := kt.(string)
		v, ok := vt.(string)
		if !ok {
			return nil, fmt.Errorf("value of %q is not a string", k)
		}
		out = append(out, KV{k, v})
	}
	if _, err := dec.Token(); err != nil {
		return nil, err
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("trailing data")
	}
	return out, nil
}

// DecodeHeaders reads an event from a binary-mode message without the SDK: the wire
// name from ce-qubesevent, the qube from ce-subject, the keyword arguments from the
// data. It is the gateway's hot path (one decode per event for every subscriber);
// Decode is the general reader. A structured-mode event (a name not HeaderSafe) is
// read from its JSON.
func DecodeHeaders(msg *nats.Msg) (Event, error) {
	if msg.Header.Get("ce-specversion") == "" && msg.Header.Get(contentTypeHeader) == StructuredContentType {
		return decodeStructured(msg.Data)
	}
	name := msg.Header.Get("ce-" + ExtensionName)
	if name == "" || msg.Header.Get("ce-specversion") == "" {
		return Event{}, fmt.Errorf("%w: no ce-%s header", ErrNotQubesEvent, ExtensionName)
	}
	kw, err := parseOrderedJSON(msg.Data)
	if err != nil {
		return Event{}, fmt.Errorf("%w: data: %w", ErrNotQubesEvent, err)
	}
	return Event{VM: msg.Header.Get("ce-subject"), Name: name, Kwargs: kw}, nil
}

// decodeStructured reads an event in structured mode: the CloudEvent as a JSON object.
func decodeStructured(data []byte) (Event, error) {
	var se struct {
		SpecVersion string          `json:"specversion"`
		Type        string          `json:"type"`
		Subject     string          `json:"subject"`
		QubesEvent  string          `json:"qubesevent"`
		Data        json.RawMessage `json:"data"`
	}
	if err := json.Unmarshal(data, &se); err != nil {
		return Event{}, fmt.Errorf("%w: structured: %w", ErrNotQubesEvent, err)
	}
	if se.SpecVersion == "" || se.QubesEvent == "" || !strings.HasPrefix(se.Type, TypePrefix) {
		return Event{}, fmt.Errorf("%w: structured: no specversion, %s or type", ErrNotQubesEvent, ExtensionName)
	}
	kw, err := parseOrderedJSON(se.Data)
	if err != nil {
		return Event{}, fmt.Errorf("%w: data: %w", ErrNotQubesEvent, err)
	}
	return Event{VM: se.Subject, Name: se.QubesEvent, Kwargs: kw}, nil
}
