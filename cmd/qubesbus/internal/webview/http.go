package webview

import (
	"context"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"net/url"
	"path"
	"time"
	"unicode/utf8"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/cloudevent"
	"github.com/qubesbus/qubesbus/bus/subject"
)

//go:embed static
var static embed.FS

// ErrBadQuery marks a query parameter the feed refuses.
var ErrBadQuery = errors.New("bad query")

// Bounds of the feed's query parameters: a host or qube name becomes one subject
// token (subject.Token bounds it anyway), a type is a glob on the wire name.
const (
	maxName = subject.MaxToken
	maxType = 256
	// backlog is how many of the stream's last events a new feed starts with.
	backlog = 100
	// writeTimeout cuts off a client that stops reading, rather than hold a consumer.
	writeTimeout = 10 * time.Second
	// keepAlive is how often an idle stream sends a comment, so that a proxy keeps it
	// open and a gone client is noticed.
	keepAlive = 15 * time.Second
	// minInterval spaces a client's state updates: a burst of changes costs one
	// update per host and interval, not one per change.
	minInterval = 100 * time.Millisecond
)

// Handler serves the page and its data:
//
//	/               the page (static/index.html), /static/… its script and style
//	/api/hosts      every host's table, as JSON
//	/state          server-sent events: "host" with a host's table, at once for
//	                every host, then whenever one changes
//	/events         server-sent events: "event", the events stream from the last
//	                100 events on, filtered by host (an id, or * or empty for
//	                all), vm (a qube name) and type (a glob on the event name)
func (v *View) Handler() http.Handler {
	mux := http.NewServeMux()
	sub, _ := fs.Sub(static, "static")
	files := http.FileServerFS(sub)
	mux.Handle("GET /static/", http.StripPrefix("/static/", files))
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		http.ServeFileFS(w, r, sub, "index.html")
	})
	mux.HandleFunc("GET /api/hosts", v.serveHosts)
	mux.HandleFunc("GET /state", v.serveState)
	mux.HandleFunc("GET /events", v.serveEvents)
	return secure(mux)
}

// secure adds headers that keep the page to its own assets: no inline script or
// style, no framing, no other origin.
func secure(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		w.Header().Set("Referrer-Policy", "no-referrer")
		h.ServeHTTP(w, r)
	})
}

// Unavailable is the handler of / while there is no view (during start-up, or when
// the webview role cannot connect): 503 with the reason.
func Unavailable(reason string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.WriteHeader(http.StatusServiceUnavailable)
		fmt.Fprintln(w, "web view:", reason)
	})
}

func (v *View) serveHosts(w http.ResponseWriter, _ *http.Request) {
	hosts := v.Hosts()
	out := make([]json.RawMessage, 0, len(hosts))
	for _, h := range hosts {
		if b, _, ok := v.HostJSON(h.ID); ok {
			out = append(out, b)
		}
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	_ = json.NewEncoder(w).Encode(out)
}

// sse starts a server-sent event stream; send writes one event within writeTimeout.
func sse(w http.ResponseWriter) (send func(event string, data []byte) error) {
	rc := http.NewResponseController(w)
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	return func(event string, data []byte) error {
		_ = rc.SetWriteDeadline(time.Now().Add(writeTimeout))
		var err error
		if event == "" { // a comment: keeps the stream alive
			_, err = fmt.Fprint(w, ": \n\n")
		} else {
			// data is JSON: one line, so one data field.
			_, err = fmt.Fprintf(w, "event: %s\ndata: %s\n\n", event, data)
		}
		if err == nil {
			err = rc.Flush()
		}
		return err
	}
}

// serveState sends every host's table, then each host's again whenever it changes.
func (v *View) serveState(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := v.requestContext(r)
	defer cancel()
	send := sse(w)
	sent := map[string]uint64{}
	ping := time.NewTicker(keepAlive)
	defer ping.Stop()
	for {
		changed := v.Changed() // before reading: a change after the read wakes us
		for _, h := range v.Hosts() {
			if ver, ok := sent[h.ID]; ok && ver == h.Version {
				continue
			}
			b, ver, ok := v.HostJSON(h.ID)
			if !ok {
				continue
			}
			if err := send("host", b); err != nil {
				return
			}
			sent[h.ID] = ver
		}
		select {
		case <-ctx.Done():
			return
		case <-ping.C:
			if send("", nil) != nil {
				return
			}
		case <-changed:
			// Let a burst settle into one update.
			if bus.Sleep(ctx, minInterval) != nil {
				return
			}
		}
	}
}

// requestContext ends with the request or the view (a server shutting down waits
// for its handlers, and these would never return by themselves).
func (v *View) requestContext(r *http.Request) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(r.Context())
	stop := context.AfterFunc(v.ctx, cancel)
	return ctx, func() { stop(); cancel() }
}

// FeedQuery is a validated /events query.
type FeedQuery struct {
	Host string // "" or "*": every host
	VM   string
	Type string // glob on the wire event name
}

// ParseFeedQuery validates the untrusted query of /events: names printable UTF-8 of
// at most maxName bytes, the type a well-formed glob of at most maxType bytes.
func ParseFeedQuery(q url.Values) (FeedQuery, error) {
	f := FeedQuery{Host: q.Get("host"), VM: q.Get("vm"), Type: q.Get("type")}
	for _, c := range []struct{ name, val string }{{"host", f.Host}, {"vm", f.VM}, {"type", f.Type}} {
		limit := maxName
		if c.name == "type" {
			limit = maxType
		}
		if len(c.val) > limit {
			return FeedQuery{}, fmt.Errorf("%w: %s longer than %d bytes", ErrBadQuery, c.name, limit)
		}
		if !printable(c.val) {
			return FeedQuery{}, fmt.Errorf("%w: %s is not printable text", ErrBadQuery, c.name)
		}
	}
	if f.Type != "" {
		if _, err := path.Match(f.Type, ""); err != nil {
			return FeedQuery{}, fmt.Errorf("%w: type: %w", ErrBadQuery, err)
		}
	}
	return f, nil
}

func printable(s string) bool {
	if !utf8.ValidString(s) {
		return false
	}
	for _, r := range s {
		if r < ' ' || r == 0x7f {
			return false
		}
	}
	return true
}

// Filter is the query's subject filter on the events stream.
func (f FeedQuery) Filter() string {
	host := "*"
	if f.Host != "" && f.Host != "*" {
		host = subject.Token(f.Host)
	}
	vm := "*"
	if f.VM != "" {
		vm = subject.Token(f.VM)
	}
	return subject.Prefix + "." + host + ".events." + vm + ".>"
}

// FeedEvent is one event of the feed.
type FeedEvent struct {
	Seq    uint64      `json:"seq"`
	Time   time.Time   `json:"time"`
	Host   string      `json:"host"`
	VM     string      `json:"vm,omitempty"`
	Event  string      `json:"event"`
	Kwargs [][2]string `json:"kwargs"`
}

// serveEvents streams the events stream through an ordered consumer of its own, which
// resumes after the last event it delivered when NATS reconnects.
func (v *View) serveEvents(w http.ResponseWriter, r *http.Request) {
	q, err := ParseFeedQuery(r.URL.Query())
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	ctx, cancel := v.requestContext(r)
	defer cancel()
	cfg := jetstream.OrderedConsumerConfig{FilterSubjects: []string{q.Filter()}, DeliverPolicy: jetstream.DeliverNewPolicy}
	if s, err := v.js.Stream(ctx, cloudevent.StreamName); err == nil {
		if info, err := s.Info(ctx); err == nil && info.State.LastSeq > 0 {
			cfg.DeliverPolicy = jetstream.DeliverByStartSequencePolicy
			cfg.OptStartSeq = max(1, info.State.FirstSeq, info.State.LastSeq-min(info.State.LastSeq, backlog-1))
		}
	}
	cons, err := v.js.OrderedConsumer(ctx, cloudevent.StreamName, cfg)
	if err != nil {
		http.Error(w, "events consumer: "+err.Error(), http.StatusServiceUnavailable)
		return
	}
	it, err := cons.Messages()
	if err != nil {
		http.Error(w, "events: "+err.Error(), http.StatusServiceUnavailable)
		return
	}
	defer it.Stop()
	context.AfterFunc(ctx, it.Stop)
	send := sse(w)
	msgs := make(chan jetstream.Msg)
	go func() {
		defer close(msgs)
		for {
			msg, err := it.Next()
			if err != nil {
				return
			}
			select {
			case msgs <- msg:
			case <-ctx.Done():
				return
			}
		}
	}()
	if send("", nil) != nil { // the headers now: the page knows it is connected
		return
	}
	ping := time.NewTicker(keepAlive)
	defer ping.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-ping.C:
			if send("", nil) != nil {
				return
			}
		case msg, ok := <-msgs:
			if !ok {
				return
			}
			ev, ok := v.feedEvent(ctx, msg, q)
			if !ok {
				continue
			}
			b, err := json.Marshal(ev)
			if err != nil {
				continue
			}
			if send("event", b) != nil {
				return
			}
		}
	}
}

// feedEvent decodes a message of the stream; !ok for one the query's type excludes
// or that is not an event.
func (v *View) feedEvent(ctx context.Context, msg jetstream.Msg, q FeedQuery) (FeedEvent, bool) {
	ev, ce, err := cloudevent.Decode(ctx, &nats.Msg{Subject: msg.Subject(), Header: msg.Headers(), Data: msg.Data()})
	if err != nil {
		return FeedEvent{}, false
	}
	if q.Type != "" {
		if ok, _ := path.Match(q.Type, ev.Name); !ok {
			return FeedEvent{}, false
		}
	}
	// A hashed subject token matches other names with the same prefix and hash; the
	// exact names are in the event.
	host := cloudevent.HostOf(ce)
	if (q.VM != "" && ev.VM != q.VM) || (q.Host != "" && q.Host != "*" && host != q.Host) {
		return FeedEvent{}, false
	}
	out := FeedEvent{Time: ce.Time(), Host: host, VM: ev.VM, Event: ev.Name, Kwargs: make([][2]string, len(ev.Kwargs))}
	if meta, err := msg.Metadata(); err == nil {
		out.Seq = meta.Sequence.Stream
	}
	for i, kv := range ev.Kwargs {
		out.Kwargs[i] = [2]string{kv.Key, kv.Value}
	}
	return out, true
}
