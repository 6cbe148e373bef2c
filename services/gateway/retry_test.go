package gateway

import (
	"context"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/bus/envelope"
	"github.com/qubesbus/qubesbus/bus/rpc"
	"github.com/qubesbus/qubesbus/bus/subject"
)

type oneQube struct{}

// A fixed set of qubes: always at revision 0, never waits.
func (oneQube) Revision() uint64                           { return 0 }
func (oneQube) WaitRevision(context.Context, uint64) error { return nil }

func (oneQube) ResolveName(_ context.Context, name string) (rpc.Ref, error) {
	return rpc.Ref{Name: "dom0", Class: "AdminVM"}, nil
}
func (oneQube) ResolveUUID(context.Context, string) (rpc.Ref, error) { return rpc.Ref{}, nil }

func ask(t *testing.T, sock, req string) (string, time.Duration) {
	t.Helper()
	start := time.Now()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	c.Write([]byte(req))
	c.(*net.UnixConn).CloseWrite()
	b, _ := io.ReadAll(c)
	return string(b), time.Since(start)
}

// serveGateway runs a gateway for reg on a socket in a temp dir until the test ends.
func serveGateway(t *testing.T, ns *server.Server, cfg Config, reg *rpc.Registry) (*Server, string) {
	t.Helper()
	cfg.Socket = filepath.Join(t.TempDir(), "s.sock")
	cfg.Registry = reg
	gw, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	if _, err := gw.Serve(ctx, bustest.Connect(t, ns)); err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cancel()
		gw.Wait()
	})
	return gw, cfg.Socket
}

// A read finds a service that starts during its retry window; a change that finds no
// service is not retried.
func TestReadsRetryChangesDoNot(t *testing.T) {
	ns := bustest.RunJetStream(t)
	host := subject.ForHost("t")
	reg := rpc.NewRegistry(
		rpc.Method{Name: "admin.vm.List", Service: rpc.Properties, Arg: rpc.Forbidden, Payload: rpc.Forbidden},
		rpc.Method{Name: "admin.vm.feature.Set", Service: rpc.Properties, Arg: rpc.Required, ChangesConfig: true, Access: rpc.Write},
	)
	gw, sock := serveGateway(t, ns, Config{Host: host, RetryWindow: 10 * time.Second}, reg)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	sent := gw.nc.Stats().OutMsgs
	if got, _ := ask(t, sock, "admin.vm.feature.Set+f dom0 name dom0\x00v"); got != "" {
		t.Fatalf("change with no service answered %q", got)
	}
	if n := gw.nc.Stats().OutMsgs - sent; n != 1 {
		t.Fatalf("change sent %d times, want once", n)
	}

	mux := rpc.NewMux(reg, rpc.Properties, oneQube{}, slog.New(slog.DiscardHandler))
	mux.Handle("admin.vm.List", func(context.Context, *rpc.Call) ([]byte, error) { return []byte("dom0\n"), nil })
	svcNC := bustest.Connect(t, ns)
	sent = gw.nc.Stats().OutMsgs
	go func() {
		// The service comes up once the gateway has sent the read a second time, so
		// the read is retrying. (A subscriber watching for it would be a responder.)
		for gw.nc.Stats().OutMsgs-sent < 2 {
			if ctx.Err() != nil {
				return
			}
			time.Sleep(time.Millisecond)
		}
		if _, err := mux.Serve(ctx, svcNC, host); err != nil {
			t.Error(err)
		}
	}()
	got, took := ask(t, sock, "admin.vm.List+ dom0 name dom0\x00")
	if got != "0\x00dom0\n" {
		t.Fatalf("read during failover answered %q", got)
	}
	t.Logf("read answered after %s", took.Round(time.Millisecond))
}

// A read answered "behind" (the instance's replica lags the caller) is sent again, and
// the caller gets the answer of an instance that has caught up.
func TestBehindReadsAreSentAgain(t *testing.T) {
	ns := bustest.RunJetStream(t)
	host := subject.ForHost("t")
	reg := rpc.NewRegistry(rpc.Method{Name: "admin.vm.List", Service: rpc.Properties, Arg: rpc.Forbidden, Payload: rpc.Forbidden})
	_, sock := serveGateway(t, ns, Config{Host: host, RetryWindow: 10 * time.Second}, reg)
	nc := bustest.Connect(t, ns)
	var asked atomic.Int32
	sub, err := nc.Subscribe(host.API("admin.vm.List"), func(m *nats.Msg) {
		rep := nats.NewMsg(m.Reply)
		if asked.Add(1) <= 2 {
			rep.Header.Set(envelope.HeaderStatus, envelope.StatusBehind)
		} else {
			rep.Header, rep.Data = envelope.OK([]byte("dom0\n"))
		}
		_ = m.RespondMsg(rep)
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	if got, _ := ask(t, sock, "admin.vm.List+ dom0 name dom0\x00"); got != "0\x00dom0\n" || asked.Load() != 3 {
		t.Fatalf("answered %q after %d attempts, want the third attempt's answer", got, asked.Load())
	}
}
