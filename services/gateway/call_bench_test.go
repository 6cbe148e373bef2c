package gateway

import (
	"context"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"testing"

	"github.com/nats-io/nats.go"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/bus/rpc"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/schemas/configstore"
)

// BenchmarkCall is one Admin API call along the whole request path, on one machine:
// a client on the socket, the gateway, an rpc.Mux handler, and a request from that
// handler to another service (as properties asks persistence), each over in-process
// NATS. With tracing off (no provider installed) its time and allocations are those
// of the path without tracing: compare with the same benchmark on a tree without it.
func BenchmarkCall(b *testing.B) {
	ns := bustest.RunJetStream(b)
	host := subject.ForHost("b")
	reg := rpc.NewRegistry(
		rpc.Method{Name: "admin.vm.feature.Set", Service: rpc.Properties, Arg: rpc.Required, Access: rpc.Write},
	)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	// The other service: answers every store request.
	store := bustest.Connect(b, ns)
	if _, err := store.Subscribe(configstore.ApplySubject(host, string(rpc.Properties)), func(m *nats.Msg) { _ = m.Respond([]byte(`{"revision":1}`)) }); err != nil {
		b.Fatal(err)
	}
	if err := store.Flush(); err != nil {
		b.Fatal(err)
	}
	svc := bustest.Connect(b, ns)
	mux := rpc.NewMux(reg, rpc.Properties, namedQubes{}, slog.New(slog.DiscardHandler))
	mux.Auth = onlyDom0{}
	mux.Handle("admin.vm.feature.Set", func(ctx context.Context, c *rpc.Call) ([]byte, error) {
		rep, err := bus.Request(ctx, svc, &nats.Msg{Subject: configstore.ApplySubject(host, string(rpc.Properties)), Data: c.Payload}, 0)
		if err != nil {
			return nil, err
		}
		return rep.Data[:0], nil
	})
	if _, err := mux.Serve(ctx, svc, host); err != nil {
		b.Fatal(err)
	}

	gw, err := New(Config{Host: host, Registry: reg, Socket: filepath.Join(b.TempDir(), "s.sock")})
	if err != nil {
		b.Fatal(err)
	}
	gctx, gcancel := context.WithCancel(ctx)
	if _, err := gw.Serve(gctx, bustest.Connect(b, ns)); err != nil {
		b.Fatal(err)
	}
	defer func() { gcancel(); gw.Wait() }()

	req := []byte("admin.vm.feature.Set+gui dom0 name work\x00value")
	want := "0\x00"
	buf := make([]byte, 64)
	b.ReportAllocs()
	for b.Loop() {
		c, err := net.Dial("unix", gw.cfg.Socket)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := c.Write(req); err != nil {
			b.Fatal(err)
		}
		_ = c.(*net.UnixConn).CloseWrite()
		n, err := io.ReadFull(c, buf[:len(want)])
		c.Close()
		if err != nil || string(buf[:n]) != want {
			b.Fatalf("reply %q: %v", buf[:n], err)
		}
	}
}
