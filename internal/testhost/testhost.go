// Package testhost starts one qubesbus host for a service's tests: an embedded
// JetStream server in a temporary directory, the events stream, and a real
// persistence service seeded from a qubes.xml. Services stand side by side and import
// no other service; their tests get the persistence service they run against from
// here, so that every test runs on real parts and no service's test builds its own.
package testhost

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/bus/cloudevent"
	"github.com/qubesbus/qubesbus/bus/envelope"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/schemas/configstore"
	"github.com/qubesbus/qubesbus/schemas/replica"
	"github.com/qubesbus/qubesbus/services/persistence"
)

// Fixture is the repository's qubes.xml recorded from a real dom0, as a path relative
// to a service module's directory (services/<name>).
const Fixture = "../../testdata/qubes.xml"

// ID is the host id every test host uses.
const ID = "t"

// Host is a running test host. Everything it starts stops when the test ends.
type Host struct {
	T        testing.TB
	Server   *server.Server
	NC       *nats.Conn // the test's own connection
	Subjects subject.Host
	Store    *persistence.Store
	Events   jetstream.Stream
	// Ctx ends when the test does.
	Ctx context.Context
}

// Start runs the NATS server, the events stream and persistence seeded from seedXML
// (Fixture when empty).
func Start(t testing.TB, seedXML string) *Host {
	t.Helper()
	if seedXML == "" {
		seedXML = Fixture
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	h := &Host{T: t, Server: bustest.RunJetStream(t), Subjects: subject.ForHost(ID), Ctx: ctx}
	h.NC = bustest.Connect(t, h.Server)
	js, err := jetstream.New(h.NC)
	if err != nil {
		t.Fatal(err)
	}
	if h.Events, err = cloudevent.EnsureStream(ctx, js, cloudevent.StreamConfig{}); err != nil {
		t.Fatal(err)
	}
	h.Store, err = persistence.New(persistence.Config{Host: h.Subjects, DataDir: t.TempDir(), SeedXML: seedXML,
		Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	svc, err := h.Store.Serve(ctx, h.Connect())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = svc.Stop()
		sctx, scancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer scancel()
		_ = h.Store.Close(sctx)
	})
	return h
}

// Connect returns a new connection to the host's server, closed when the test ends.
func (h *Host) Connect() *nats.Conn { return bustest.Connect(h.T, h.Server) }

// Follow returns a replica of the configuration that follows the change log on nc.
func (h *Host) Follow(nc *nats.Conn) *replica.Replica {
	h.T.Helper()
	rep, err := replica.Follow(h.Ctx, nc, h.Subjects, slog.New(slog.DiscardHandler))
	if err != nil {
		h.T.Fatal(err)
	}
	return rep
}

// WaitWritten returns once qubes.xml holds the store's current revision (written in
// the background after the replies); a test failure if the test's deadline passes.
func (h *Host) WaitWritten() {
	h.T.Helper()
	rev := h.Store.Revision()
	for h.Store.Metrics().Written < rev {
		if err := bus.Sleep(h.Ctx, time.Millisecond); err != nil {
			h.T.Fatalf("qubes.xml at revision %d, waiting for %d: %v", h.Store.Metrics().Written, rev, err)
		}
	}
}

// Config is a client of the persistence service on the test's connection.
func (h *Host) Config() configstore.Client {
	return configstore.Client{NC: h.NC, Host: h.Subjects, Caller: configstore.Operator}
}

// Call makes one Admin API call as the gateway would, from src (dom0 when empty), and
// returns the reply envelope. A reply that does not come is a test failure: the bound
// is the test's own deadline, not a per-call one a busy machine could miss.
func (h *Host) Call(src, method, dest, arg string, payload []byte) envelope.Reply {
	h.T.Helper()
	if src == "" {
		src = "dom0"
	}
	req := &envelope.Request{Method: method, Source: src, Dest: dest, Arg: arg, Payload: payload,
		ID: fmt.Sprintf("%s-%d", h.T.Name(), time.Now().UnixNano())}
	msg, err := h.NC.RequestMsgWithContext(h.Ctx, req.Msg(h.Subjects.API(method)))
	if err != nil {
		h.T.Fatalf("%s %s+%s: %v", method, dest, arg, err)
	}
	rep, err := envelope.ParseReply(msg)
	if err != nil {
		h.T.Fatalf("%s: %v", method, err)
	}
	return rep
}

// Wire makes a call from dom0 and renders its reply as the wire shows it: "0:content",
// "2:Class:message", or "abort" for a connection closed with no answer.
func (h *Host) Wire(method, dest, arg, payload string) string {
	h.T.Helper()
	rep := h.Call("", method, dest, arg, []byte(payload))
	switch rep.Status {
	case envelope.StatusOK:
		return "0:" + string(rep.Content)
	case envelope.StatusException:
		return "2:" + rep.Exception.Class + ":" + rep.Exception.Message
	}
	return "abort"
}

// EventsAfter returns the events stored after stream sequence *seq, rendered
// "vm|name|k=v,k=v", and moves *seq past them. A call replies only after its events
// are stored, so there is nothing to wait for.
func (h *Host) EventsAfter(seq *uint64) []string {
	h.T.Helper()
	info, err := h.Events.Info(h.Ctx)
	if err != nil {
		h.T.Fatal(err)
	}
	var out []string
	for ; *seq < info.State.LastSeq; *seq++ {
		raw, err := h.Events.GetMsg(h.Ctx, *seq+1)
		if err != nil {
			h.T.Fatal(err)
		}
		ev, _, err := cloudevent.Decode(h.Ctx, &nats.Msg{Subject: raw.Subject, Header: raw.Header, Data: raw.Data})
		if err != nil {
			h.T.Fatal(err)
		}
		kv := make([]string, len(ev.Kwargs))
		for i, a := range ev.Kwargs {
			kv[i] = a.Key + "=" + a.Value
		}
		out = append(out, ev.VM+"|"+ev.Name+"|"+strings.Join(kv, ","))
	}
	return out
}
