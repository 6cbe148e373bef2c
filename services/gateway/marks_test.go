package gateway

import (
	"context"
	"log/slog"
	"sync"
	"testing"

	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/bus/envelope"
	"github.com/qubesbus/qubesbus/bus/rpc"
	"github.com/qubesbus/qubesbus/bus/subject"
)

// Every request carries the newest marks of any earlier reply, whichever service sent
// it, so that no instance serves state older than what a caller has already seen.
func TestRequestsCarryTheNewestMarks(t *testing.T) {
	ns := bustest.RunJetStream(t)
	host := subject.ForHost("t")
	reg := rpc.NewRegistry(
		rpc.Method{Name: "admin.vm.List", Service: rpc.Properties, Arg: rpc.Forbidden, Payload: rpc.Forbidden},
		rpc.Method{Name: "admin.vm.Start", Service: rpc.VMLifecycle, Arg: rpc.Forbidden, Payload: rpc.Forbidden, Access: rpc.Execute},
	)
	gw, sock := serveGateway(t, ns, Config{Host: host}, reg)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	var mu sync.Mutex
	var seen []envelope.Marks
	record := func(_ context.Context, c *rpc.Call) ([]byte, error) {
		mu.Lock()
		seen = append(seen, c.After)
		mu.Unlock()
		return nil, nil
	}
	// The lifecycle's replies carry runtime marks; versions move with every call.
	var version uint64 = 41
	life := rpc.NewMux(reg, rpc.VMLifecycle, oneQube{}, slog.New(slog.DiscardHandler))
	life.RuntimeMark = func() envelope.RuntimeMark {
		mu.Lock()
		defer mu.Unlock()
		version++
		return envelope.RuntimeMark{Epoch: 7, Version: version}
	}
	life.Handle("admin.vm.Start", record)
	props := rpc.NewMux(reg, rpc.Properties, oneQube{}, slog.New(slog.DiscardHandler))
	props.Handle("admin.vm.List", record)
	for _, m := range []*rpc.Mux{life, props} {
		if _, err := m.Serve(ctx, bustest.Connect(t, ns), host); err != nil {
			t.Fatal(err)
		}
	}

	for _, req := range []string{"admin.vm.List+ dom0 name dom0\x00", "admin.vm.Start+ dom0 name dom0\x00",
		"admin.vm.List+ dom0 name dom0\x00", "admin.vm.Start+ dom0 name dom0\x00", "admin.vm.List+ dom0 name dom0\x00"} {
		if got, _ := ask(t, sock, req); got != "0\x00" {
			t.Fatalf("%q answered %q", req, got)
		}
	}
	want := []envelope.RuntimeMark{{}, {}, {Epoch: 7, Version: 42}, {Epoch: 7, Version: 42}, {Epoch: 7, Version: 43}}
	mu.Lock()
	defer mu.Unlock()
	for i, w := range want {
		if seen[i].Runtime != w {
			t.Errorf("request %d carried runtime mark %v, want %v", i, seen[i].Runtime, w)
		}
	}
	if got := gw.Marks().Runtime; got != (envelope.RuntimeMark{Epoch: 7, Version: 43}) {
		t.Errorf("gateway's newest mark %v", got)
	}
}
