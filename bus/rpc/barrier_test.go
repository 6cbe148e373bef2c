package rpc

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/bus/envelope"
	"github.com/qubesbus/qubesbus/bus/qerr"
	"github.com/qubesbus/qubesbus/bus/subject"
)

// laggingReplica is a resolver over a replica that reaches revisions when told. A
// caller that starts waiting for a revision it lacks is reported on waiting.
type laggingReplica struct {
	qubes
	mu      sync.Mutex
	rev     uint64
	up      chan struct{}
	waiting chan uint64
}

func (r *laggingReplica) Revision() uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.rev
}

func (r *laggingReplica) advance(rev uint64) {
	r.mu.Lock()
	r.rev = rev
	close(r.up)
	r.up = make(chan struct{})
	r.mu.Unlock()
}

func (r *laggingReplica) WaitRevision(ctx context.Context, rev uint64) error {
	for {
		r.mu.Lock()
		cur, up := r.rev, r.up
		r.mu.Unlock()
		if cur >= rev {
			return nil
		}
		select {
		case r.waiting <- rev:
		default:
		}
		select {
		case <-up:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// A call that carries a configuration revision is served only once the replica holds
// it (read-your-writes across instances); its reply carries the replica's revision.
func TestMuxWaitsForTheCallersRevision(t *testing.T) {
	ns := bustest.RunJetStream(t)
	host := subject.ForHost("t")
	reg := NewRegistry(Method{Name: "admin.vm.List", Service: Properties, Arg: Forbidden, Payload: Forbidden})
	rep := &laggingReplica{qubes: qubes{"dom0": {Name: "dom0", Class: "AdminVM", UUID: "00000000-0000-0000-0000-000000000000"}},
		rev: 3, up: make(chan struct{}), waiting: make(chan uint64, 1)}
	mux := NewMux(reg, Properties, rep, slog.New(slog.DiscardHandler))
	mux.BarrierWait = 2 * time.Second
	var servedAt uint64
	mux.Handle("admin.vm.List", func(context.Context, *Call) ([]byte, error) {
		servedAt = rep.Revision()
		return []byte("dom0\n"), nil
	})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if _, err := mux.Serve(ctx, bustest.Connect(t, ns), host); err != nil {
		t.Fatal(err)
	}
	client := bustest.Connect(t, ns)
	call := func(after uint64) envelope.Reply {
		t.Helper()
		return callMux(ctx, t, client, host, &envelope.Request{Method: "admin.vm.List", Source: "dom0", Dest: "dom0",
			After: envelope.Marks{ConfigRev: after}})
	}

	if r := call(2); r.Err() != nil || r.Marks.ConfigRev != 3 || servedAt != 3 {
		t.Fatalf("older revision: %+v served at %d", r, servedAt)
	}
	// The replica reaches 5 once the call waits for it, so the call is served only
	// after waiting.
	go func() {
		for rev := range rep.waiting {
			if rev == 5 {
				rep.advance(5)
				return
			}
		}
	}()
	if r := call(5); r.Err() != nil || r.Marks.ConfigRev != 5 || servedAt != 5 {
		t.Fatalf("newer revision: %+v served at %d, want 5", r, servedAt)
	}
	// A replica that does not catch up soon answers "behind" rather than from the
	// past; the gateway sends the read again.
	if r := call(9); r.Status != envelope.StatusBehind || !errors.Is(r.Err(), qerr.ErrAbort) {
		t.Fatalf("revision the replica never reaches: %+v", r)
	}
}
