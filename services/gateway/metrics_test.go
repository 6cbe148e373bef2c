package gateway

import (
	"context"
	"encoding/json"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/micro"

	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/bus/rpc"
	"github.com/qubesbus/qubesbus/bus/subject"
)

// callLog is a CallMetrics that keeps what it was told.
type callLog struct {
	mu    sync.Mutex
	calls []string // method/outcome
}

func (l *callLog) ObserveCall(method, outcome string, d time.Duration) {
	if d <= 0 {
		outcome += " (no duration)"
	}
	l.mu.Lock()
	l.calls = append(l.calls, method+"/"+outcome)
	l.mu.Unlock()
}

// TestCallMetrics: every relayed call is counted once with its outcome, under its
// method when the registry has it and under "" otherwise (a client's made-up method
// names must not become label values).
func TestCallMetrics(t *testing.T) {
	ns := bustest.RunJetStream(t)
	host := subject.ForHost("t")
	reg := rpc.NewRegistry(
		rpc.Method{Name: "admin.vm.List", Service: rpc.Properties, Arg: rpc.Forbidden, Payload: rpc.Forbidden},
	)
	mux := rpc.NewMux(reg, rpc.Properties, namedQubes{}, slog.New(slog.DiscardHandler))
	mux.Auth = onlyDom0{}
	mux.HandleUnknown()
	mux.Handle("admin.vm.List", func(context.Context, *rpc.Call) ([]byte, error) { return []byte("x"), nil })
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if _, err := mux.Serve(ctx, bustest.Connect(t, ns), host); err != nil {
		t.Fatal(err)
	}
	m := &callLog{}
	_, sock := serveGateway(t, ns, Config{Host: host, Metrics: m}, reg)
	ask(t, sock, "admin.vm.List+ dom0 name dom0\x00")
	ask(t, sock, "admin.vm.List+ work name dom0\x00")
	ask(t, sock, "admin.made.Up+ dom0 name dom0\x00")
	ask(t, sock, "no NUL here") // not a call
	want := []string{"admin.vm.List/ok", "admin.vm.List/exception", "/exception"}
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(m.calls) != len(want) {
		t.Fatalf("counted %q, want %q", m.calls, want)
	}
	for i := range want {
		if m.calls[i] != want[i] {
			t.Errorf("call %d counted as %q, want %q", i, m.calls[i], want[i])
		}
	}
}

// TestGatewayIsDiscoverable: the gateway answers micro discovery ($SRV.PING and
// $SRV.INFO, by name too) like every other service.
func TestGatewayIsDiscoverable(t *testing.T) {
	ns := bustest.RunJetStream(t)
	host := subject.ForHost("t")
	_, sock := serveGateway(t, ns, Config{Host: host}, rpc.NewRegistry())
	nc := bustest.Connect(t, ns)
	for _, subj := range []string{"$SRV.PING", "$SRV.PING." + rpc.Gateway.Micro()} {
		msg, err := nc.Request(subj, nil, 2*time.Second)
		if err != nil {
			t.Fatalf("%s: %v", subj, err)
		}
		var ping micro.Ping
		if err := json.Unmarshal(msg.Data, &ping); err != nil || ping.Name != rpc.Gateway.Micro() || ping.ID == "" {
			t.Errorf("%s: %s (%v)", subj, msg.Data, err)
		}
	}
	msg, err := nc.Request("$SRV.INFO."+rpc.Gateway.Micro(), nil, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var info micro.Info
	if err := json.Unmarshal(msg.Data, &info); err != nil {
		t.Fatal(err)
	}
	if info.Name != rpc.Gateway.Micro() || info.Version == "" || info.Metadata["host"] != "t" || info.Metadata["socket"] != sock {
		t.Errorf("info %+v", info)
	}
}
