package rpc

import (
	"context"
	"errors"
	"log/slog"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/bus/envelope"
	"github.com/qubesbus/qubesbus/bus/qerr"
	"github.com/qubesbus/qubesbus/bus/subject"
)

func TestMuxServesCancelsAndSaves(t *testing.T) {
	ns := bustest.RunJetStream(t)
	nc := bustest.Connect(t, ns)
	host := subject.ForHost("t")
	reg := NewRegistry(
		Method{Name: "admin.vm.Stats", Service: VMLifecycle, Arg: Forbidden, Payload: Forbidden, Cancellable: true},
		Method{Name: "admin.vm.feature.Set", Service: VMLifecycle, Arg: Required, ChangesConfig: true, Access: Write},
		Method{Name: "admin.vm.Console", Service: VMLifecycle},
	)
	res := qubes{"dom0": {Name: "dom0", Class: "AdminVM", UUID: "00000000-0000-0000-0000-000000000000"}}
	mux := NewMux(reg, VMLifecycle, res, slog.New(slog.DiscardHandler))
	started := make(chan struct{})
	mux.Handle("admin.vm.Stats", func(ctx context.Context, c *Call) ([]byte, error) {
		close(started)
		<-ctx.Done()
		return nil, qerr.QubesException("cancelled")
	})
	mux.Handle("admin.vm.feature.Set", func(ctx context.Context, c *Call) ([]byte, error) { return nil, nil })
	var saves atomic.Int32
	mux.AfterChange = func(context.Context, *Call) error { saves.Add(1); return nil }
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	svc, err := mux.Serve(ctx, nc, host)
	if err != nil {
		t.Fatal(err)
	}
	defer svc.Stop()
	if got := len(svc.Info().Endpoints); got != 3 {
		t.Fatalf("%d endpoints, want 3", got)
	}

	client := bustest.Connect(t, ns)
	call := func(req *envelope.Request) envelope.Reply {
		t.Helper()
		return callMux(ctx, t, client, host, req)
	}

	// A cancellable call ends when the gateway announces that its client left.
	done := make(chan envelope.Reply, 1)
	go func() {
		done <- call(&envelope.Request{Method: "admin.vm.Stats", Source: "dom0", Dest: "dom0", ID: "req.1"})
	}()
	<-started
	if err := client.Publish(host.Cancel("req.1"), nil); err != nil {
		t.Fatal(err)
	}
	select {
	case rep := <-done:
		if !errors.Is(rep.Err(), qerr.QubesException("")) {
			t.Fatalf("cancelled call replied %+v", rep)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("cancel did not stop the call")
	}

	if rep := call(&envelope.Request{Method: "admin.vm.feature.Set", Source: "dom0", Dest: "dom0", Arg: "f"}); rep.Status != envelope.StatusOK || saves.Load() != 1 {
		t.Fatalf("config change: %+v, saves %d", rep, saves.Load())
	}
	if rep := call(&envelope.Request{Method: "admin.vm.feature.Set", Source: "dom0", Dest: "nosuch", Arg: "f"}); saves.Load() != 1 || !errors.Is(rep.Err(), qerr.ErrVMNotFound) {
		t.Fatalf("failed change saved or wrong error: %+v, saves %d", rep, saves.Load())
	}
	if rep := call(&envelope.Request{Method: "admin.vm.Console", Source: "dom0", Dest: "dom0"}); !errors.Is(rep.Err(), qerr.NotImplementedError("")) {
		t.Fatalf("method without handler: %+v", rep)
	}
}

// callMux sends req as the gateway would and returns the parsed reply.
func callMux(ctx context.Context, t *testing.T, nc *nats.Conn, host subject.Host, req *envelope.Request) envelope.Reply {
	t.Helper()
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	m, err := nc.RequestMsgWithContext(rctx, req.Msg(host.API(req.Method)))
	if err != nil {
		t.Fatal(err)
	}
	rep, err := envelope.ParseReply(m)
	if err != nil {
		t.Fatal(err)
	}
	return rep
}
