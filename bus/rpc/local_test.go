package rpc

import (
	"context"
	"log/slog"
	"testing"

	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/bus/envelope"
	"github.com/qubesbus/qubesbus/bus/qerr"
	"github.com/qubesbus/qubesbus/bus/subject"
)

// A read through Local gets the reply NATS would carry, marks included, and waits for
// the caller's revision the same way; changes, and muxes no longer serving, are left
// to NATS.
func TestLocalAnswersReadsLikeNATS(t *testing.T) {
	ns := bustest.RunJetStream(t)
	host := subject.ForHost("t")
	reg := NewRegistry(
		Method{Name: "admin.vm.List", Service: Properties, Arg: Forbidden, Payload: Forbidden},
		Method{Name: "admin.vm.feature.Get", Service: Properties, Arg: Required, Payload: Forbidden},
		Method{Name: "admin.vm.feature.Set", Service: Properties, Arg: Required, ChangesConfig: true, Access: Write},
	)
	rep := &laggingReplica{qubes: qubes{"dom0": {Name: "dom0", Class: "AdminVM", UUID: "00000000-0000-0000-0000-000000000000"}},
		rev: 3, up: make(chan struct{})}
	mux := NewMux(reg, Properties, rep, slog.New(slog.DiscardHandler))
	mux.RuntimeMark = func() envelope.RuntimeMark { return envelope.RuntimeMark{Epoch: 1, Version: 7} }
	mux.Handle("admin.vm.List", func(context.Context, *Call) ([]byte, error) { return []byte("dom0\n"), nil })
	mux.Handle("admin.vm.feature.Get", func(_ context.Context, c *Call) ([]byte, error) {
		return nil, qerr.FeatureNotFoundError("Feature not set for domain dom0: " + c.Arg)
	})
	mux.Handle("admin.vm.feature.Set", func(context.Context, *Call) ([]byte, error) { return nil, nil })
	local := NewLocal()
	mux.Local = local
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if _, err := mux.Serve(ctx, bustest.Connect(t, ns), host); err != nil {
		t.Fatal(err)
	}
	client := bustest.Connect(t, ns)
	method := func(name string) *Method {
		m, _ := reg.Lookup(name)
		return &m
	}
	reads := []*envelope.Request{
		{Method: "admin.vm.List", Source: "dom0", Dest: "dom0"},
		{Method: "admin.vm.List", Source: "dom0", Dest: "nosuch"},
		{Method: "admin.vm.List", Source: "dom0", Dest: "dom0", Arg: "x"},
		{Method: "admin.vm.feature.Get", Source: "dom0", Dest: "dom0", Arg: "f"},
	}
	for _, req := range reads {
		overNATS := callMux(ctx, t, client, host, req)
		got, ok := local.Call(ctx, method(req.Method), req)
		if !ok || !sameReply(got, overNATS) {
			t.Errorf("%s to %s: local %+v (%v), over NATS %+v", req.Method, req.Dest, got, ok, overNATS)
		}
	}

	// The caller's revision: served once the replica has it.
	done := make(chan envelope.Reply, 1)
	go func() {
		r, _ := local.Call(ctx, method("admin.vm.List"), &envelope.Request{Method: "admin.vm.List", Source: "dom0", Dest: "dom0",
			After: envelope.Marks{ConfigRev: 5}})
		done <- r
	}()
	rep.advance(4)
	rep.advance(5)
	if r := <-done; r.Status != envelope.StatusOK || r.Marks.ConfigRev != 5 {
		t.Fatalf("read after revision 5: %+v", r)
	}

	if _, ok := local.Call(ctx, method("admin.vm.feature.Set"), &envelope.Request{Method: "admin.vm.feature.Set", Source: "dom0", Dest: "dom0", Arg: "f"}); ok {
		t.Error("a change was served in process")
	}
	cancel()
	if _, ok := local.Call(context.Background(), method("admin.vm.List"), reads[0]); ok {
		t.Error("a mux that stopped serving answered")
	}
}

func sameReply(a, b envelope.Reply) bool {
	if a.Status != b.Status || string(a.Content) != string(b.Content) || a.Marks != b.Marks || (a.Exception == nil) != (b.Exception == nil) {
		return false
	}
	return a.Exception == nil || *a.Exception == *b.Exception
}
