package vmlifecycle_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"

	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/bus/cloudevent"
	"github.com/qubesbus/qubesbus/bus/cloudevent/recorder"
	"github.com/qubesbus/qubesbus/bus/envelope"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/internal/testhost"
	"github.com/qubesbus/qubesbus/schemas/config"
	"github.com/qubesbus/qubesbus/schemas/configstore"
	"github.com/qubesbus/qubesbus/schemas/replica"
	"github.com/qubesbus/qubesbus/services/vmlifecycle"
	"github.com/qubesbus/qubesbus/services/vmlifecycle/simdriver"
)

const fixture = "../../testdata/qubes.xml"

// host is one simulated qubesbus host (testhost: embedded JetStream, persistence)
// with a replica, the simulated hypervisor and a lifecycle service, with every event
// captured.
type host struct {
	t      testing.TB
	x      *testhost.Host
	ns     *server.Server
	nc     *nats.Conn // the test's own connection (calls, lab)
	svcNC  *nats.Conn
	h      subject.Host
	hv     *simdriver.Hypervisor
	rep    *replica.Replica
	store  configstore.Client
	lab    simdriver.LabClient
	events *eventLog

	svc    *vmlifecycle.Service
	micro  micro.Service
	cancel context.CancelFunc
}

func newHost(t testing.TB, cfg simdriver.Config) *host {
	t.Helper()
	th := testhost.Start(t, fixture)
	x := &host{t: t, x: th, ns: th.Server, nc: th.NC, h: th.Subjects, store: th.Config()}
	x.svcNC = th.Connect()
	js, err := jetstream.New(x.nc)
	if err != nil {
		t.Fatal(err)
	}
	x.events = captureEvents(t, js, x.h)
	x.rep = th.Follow(x.svcNC)
	x.hv = simdriver.New(cfg)
	ls, err := simdriver.NewLabService(simdriver.LabServiceConfig{Host: x.h, Hypervisor: x.hv})
	if err != nil {
		t.Fatal(err)
	}
	lab, err := ls.Serve(th.Ctx, x.svcNC)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lab.Stop() })
	x.lab = simdriver.LabClient{NC: x.nc, Host: x.h}
	x.startService()
	return x
}

// startService starts (or restarts) the lifecycle service over the same hypervisor.
func (x *host) startService() {
	x.t.Helper()
	svc, err := vmlifecycle.New(vmlifecycle.Config{
		Host: x.h, Replica: x.rep, Driver: x.hv, StatsLease: 2 * time.Second,
	})
	if err != nil {
		x.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	m, err := svc.Serve(ctx, x.svcNC)
	if err != nil {
		cancel()
		x.t.Fatal(err)
	}
	x.svc, x.micro, x.cancel = svc, m, cancel
	x.t.Cleanup(func() { x.stopService() })
}

func (x *host) stopService() {
	if x.cancel != nil {
		x.cancel()
		_ = x.micro.Stop()
		x.cancel = nil
	}
}

// reply is the outcome of one Admin API call.
type reply struct {
	Status  string // ok, exception, abort
	Content string // ok content, or "Class: message"
}

func (r reply) String() string { return r.Status + " " + r.Content }

func ok(content string) reply { return reply{Status: envelope.StatusOK, Content: content} }
func exc(class, msg string) reply {
	return reply{Status: envelope.StatusException, Content: class + ": " + msg}
}

var abort = reply{Status: envelope.StatusAbort}

// call sends an Admin API call over NATS as the gateway would.
func (x *host) call(method, dest, arg string) reply {
	x.t.Helper()
	rep := x.x.Call("", method, dest, arg, nil)
	switch rep.Status {
	case envelope.StatusOK:
		return ok(string(rep.Content))
	case envelope.StatusException:
		return exc(rep.Exception.Class, rep.Exception.Message)
	}
	return reply{Status: rep.Status}
}

// state is a qube's power state as CurrentState reports it.
func (x *host) state(vm string) string {
	x.t.Helper()
	r := x.call("admin.vm.CurrentState", vm, "")
	_, st, found := strings.Cut(r.Content, "power_state=")
	if r.Status != envelope.StatusOK || !found {
		x.t.Fatalf("CurrentState %s: %v", vm, r)
	}
	return st
}

// waitState polls until a qube reaches a power state.
func (x *host) waitState(vm, want string) {
	x.t.Helper()
	bustest.CheckFor(x.t, 10*time.Second, 5*time.Millisecond, func() error {
		if st := x.state(vm); st != want {
			return fmt.Errorf("%s is %s, want %s", vm, st, want)
		}
		return nil
	})
}

// apply changes the configuration and waits until the service's replica has it.
func (x *host) apply(ops ...config.Op) {
	x.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rev, err := x.store.Apply(ctx, config.Mutation{Ops: ops})
	if err != nil {
		x.t.Fatal(err)
	}
	if err := x.rep.WaitRevision(ctx, rev); err != nil {
		x.t.Fatal(err)
	}
}

// eventLog is every event of the host in stream order, as "vm name k=v …" lines.
type eventLog struct {
	t   testing.TB
	rec *recorder.Recorder
}

func captureEvents(t testing.TB, js jetstream.JetStream, h subject.Host) *eventLog {
	t.Helper()
	return &eventLog{t: t, rec: recorder.Record(t, js, h.Events())}
}

func eventLine(e cloudevent.Event) string {
	var b strings.Builder
	b.WriteString(e.VM)
	b.WriteByte(' ')
	b.WriteString(e.Name)
	for _, kv := range e.Kwargs {
		b.WriteString(" " + kv.Key + "=" + kv.Value)
	}
	return b.String()
}

// mark returns the stream position after every event stored so far (events are
// stored before the call that fired them replies).
func (l *eventLog) mark() uint64 { return l.rec.Mark(l.t) }

// since returns the events after a mark, as far as they were delivered.
func (l *eventLog) since(mark uint64) []string {
	var out []string
	for _, r := range l.rec.Since(mark) {
		out = append(out, eventLine(r.Event))
	}
	return out
}

// callEvents makes a call that must reply want, then checks that the events after it
// are exactly events (as eventLog.expect).
func (x *host) callEvents(method, dest, arg string, want reply, events []string) {
	x.t.Helper()
	mark := x.events.mark()
	if r := x.call(method, dest, arg); r != want {
		x.t.Fatalf("%s %s+%s: %v, want %v", method, dest, arg, r, want)
	}
	x.events.expect(x.t, mark, events)
}

// expect polls until the events after mark are exactly want.
func (l *eventLog) expect(t testing.TB, mark uint64, want []string) {
	t.Helper()
	bustest.CheckFor(t, 10*time.Second, 5*time.Millisecond, func() error {
		got := l.since(mark)
		if len(got) < len(want) {
			return fmt.Errorf("have %d events, want %d:\n got %s\nwant %s", len(got), len(want), strings.Join(got, "\n     "), strings.Join(want, "\n     "))
		}
		if !slices.Equal(got, want) {
			t.Fatalf("events\n got %s\nwant %s", strings.Join(got, "\n     "), strings.Join(want, "\n     "))
		}
		return nil
	})
}

// Expected sequences (docs/spec/events.md §3).
func startSeq(vm string) []string {
	return []string{
		vm + " domain-pre-start start_guid=True mem_required=None",
		vm + " domain-verify-files",
		vm + " domain-pre-spawn start_guid=True",
		vm + " property-reset:xid name=xid",
		vm + " property-reset:stubdom_xid name=stubdom_xid",
		vm + " property-reset:start_time name=start_time",
		vm + " domain-spawn start_guid=True",
		vm + " domain-qdb-create",
		vm + " domain-pre-unpaused",
		vm + " domain-unpaused",
		vm + " domain-start start_guid=True",
	}
}

func stopSeq(vm string) []string {
	return []string{
		vm + " domain-stopped",
		vm + " property-reset:xid name=xid",
		vm + " property-reset:stubdom_xid name=stubdom_xid",
		vm + " property-reset:start_time name=start_time",
		vm + " domain-shutdown",
	}
}

func seq(parts ...any) []string {
	var out []string
	for _, p := range parts {
		switch v := p.(type) {
		case string:
			out = append(out, v)
		case []string:
			out = append(out, v...)
		}
	}
	return out
}
