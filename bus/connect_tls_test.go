package bus_test

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/bustest"
)

// A server that requires TLS and verifies clients accepts a service that brings the CA
// and its certificate, and refuses one without either.
func TestConnectWithTLS(t *testing.T) {
	ns, ca, cliCert, cliKey := runTLSServer(t)
	url := ns.ClientURL()
	log := slog.New(slog.DiscardHandler)
	connect := func(tls bus.TLSFiles) error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		nc, err := bus.Connect(ctx, bus.ConnConfig{URL: url, Name: "tls-test", TLS: tls, MaxReconnects: 1}, log)
		if err == nil {
			defer nc.Close()
			if !nc.TLSRequired() {
				t.Error("connected without TLS")
			}
		}
		return err
	}
	if err := connect(bus.TLSFiles{CA: ca, Cert: cliCert, Key: cliKey}); err != nil {
		t.Fatalf("with the CA and a client certificate: %v", err)
	}
	if err := connect(bus.TLSFiles{CA: ca}); err == nil {
		t.Fatal("connected without a client certificate to a server that verifies clients")
	}
	if err := connect(bus.TLSFiles{Cert: cliCert, Key: cliKey}); err == nil {
		t.Fatal("trusted a server certificate from an unknown CA")
	}
	if err := (bus.ConnConfig{URL: url, Name: "x", TLS: bus.TLSFiles{Cert: cliCert}}).Validate(); err == nil {
		t.Fatal("a client certificate without its key validated")
	}
}

// runTLSServer runs a server that requires TLS and verifies clients, and returns it
// with the CA and a client certificate it trusts.
func runTLSServer(t *testing.T) (ns *server.Server, ca, cliCert, cliKey string) {
	t.Helper()
	ca, srvCert, srvKey, cliCert, cliKey := bustest.PKI(t, t.TempDir())
	tc, err := server.GenTLSConfig(&server.TLSConfigOpts{CertFile: srvCert, KeyFile: srvKey, CaFile: ca, Verify: true})
	if err != nil {
		t.Fatal(err)
	}
	ns = runServer(t, &server.Options{Host: "127.0.0.1", Port: -1, NoLog: true, NoSigs: true,
		TLS: true, TLSVerify: true, TLSConfig: tc, TLSTimeout: 2})
	return ns, ca, cliCert, cliKey
}

// runServer runs a server with opts until the test ends.
func runServer(t *testing.T, opts *server.Options) *server.Server {
	t.Helper()
	ns, err := server.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	go ns.Start()
	t.Cleanup(ns.Shutdown)
	if !ns.ReadyForConnections(10 * time.Second) {
		t.Fatal("server not ready")
	}
	return ns
}

// An over-long subject costs its message, not the connection: the server would close
// the connection, and nats.go would not reconnect after that error.
func TestOverlongSubjectKeepsTheConnection(t *testing.T) {
	ns := bustest.RunJetStream(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for _, cc := range []bus.ConnConfig{{URL: ns.ClientURL(), Name: "tcp"}, {InProcess: ns, Name: "in-process"}} {
		expectOverlongDropped(t, ctx, cc)
	}
}

// Over TLS too: the line guard sits above TLS, which the connection starts itself
// after the server's INFO.
func TestOverlongSubjectKeepsTheTLSConnection(t *testing.T) {
	ns, ca, cliCert, cliKey := runTLSServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	nc := expectOverlongDropped(t, ctx, bus.ConnConfig{URL: ns.ClientURL(), Name: "tls-guard",
		TLS: bus.TLSFiles{CA: ca, Cert: cliCert, Key: cliKey}})
	// The server saw the connection speak TLS (and, verifying clients, took its certificate).
	cid, err := nc.GetClientID()
	if err != nil {
		t.Fatal(err)
	}
	connz, err := ns.Connz(&server.ConnzOptions{CID: cid})
	if err != nil || len(connz.Conns) != 1 {
		t.Fatalf("connz: %v, %d connections", err, len(connz.Conns))
	}
	if c := connz.Conns[0]; c.TLSVersion == "" {
		t.Fatalf("the server saw no TLS on the connection: %+v", c)
	}
}

// expectOverlongDropped connects with cc and sends a message, a message with headers
// and a subscription on a subject too long for the server: each is dropped and
// logged, and the connection goes on as if they had not been sent.
func expectOverlongDropped(t *testing.T, ctx context.Context, cc bus.ConnConfig) *nats.Conn {
	t.Helper()
	var logs bytes.Buffer
	nc, err := bus.Connect(ctx, cc, slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	sub, err := nc.SubscribeSync("ping")
	if err != nil {
		t.Fatal(err)
	}
	long := "x." + strings.Repeat("a", 2*bus.MaxControlLine)
	if err := nc.Publish(long, []byte("x")); err != nil {
		t.Fatal(err)
	}
	msg := nats.NewMsg(long)
	msg.Header.Set("h", "v")
	if err := nc.PublishMsg(msg); err != nil {
		t.Fatal(err)
	}
	if _, err := nc.SubscribeSync(long); err != nil {
		t.Fatal(err)
	}
	if err := nc.Publish("ping", []byte("1")); err != nil {
		t.Fatal(err)
	}
	if _, err := sub.NextMsg(5 * time.Second); err != nil {
		t.Fatalf("%s: %v (status %v, last error %v)", cc.Name, err, nc.Status(), nc.LastError())
	}
	if nc.Status() != nats.CONNECTED || nc.LastError() != nil || nc.Stats().Reconnects != 0 {
		t.Fatalf("%s: status %v, last error %v, %d reconnects", cc.Name, nc.Status(), nc.LastError(), nc.Stats().Reconnects)
	}
	if n := strings.Count(logs.String(), "nats message dropped"); n != 3 {
		t.Fatalf("%s: %d drops logged, want 3:\n%s", cc.Name, n, logs.String())
	}
	return nc
}

// Websocket URLs still connect, in the clear and over TLS (wss): nats.go frames and
// secures them itself, and the guard passes the frames.
func TestConnectOverWebsocket(t *testing.T) {
	ca, srvCert, srvKey, _, _ := bustest.PKI(t, t.TempDir())
	tc, err := server.GenTLSConfig(&server.TLSConfigOpts{CertFile: srvCert, KeyFile: srvKey})
	if err != nil {
		t.Fatal(err)
	}
	for _, secure := range []bool{false, true} {
		opts := &server.Options{Host: "127.0.0.1", Port: -1, NoLog: true, NoSigs: true}
		opts.Websocket.Host, opts.Websocket.Port = "127.0.0.1", -1
		var files bus.TLSFiles
		if secure {
			opts.Websocket.TLSConfig, files.CA = tc, ca
		} else {
			opts.Websocket.NoTLS = true
		}
		ns := runServer(t, opts)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		nc, err := bus.Connect(ctx, bus.ConnConfig{URL: ns.WebsocketURL(), Name: "ws", TLS: files}, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatalf("%s: %v", ns.WebsocketURL(), err)
		}
		defer nc.Close()
		sub, err := nc.SubscribeSync("ping")
		if err != nil {
			t.Fatal(err)
		}
		if err := nc.Publish("ping", []byte("1")); err != nil {
			t.Fatal(err)
		}
		if _, err := sub.NextMsg(5 * time.Second); err != nil {
			t.Fatalf("%s: %v", ns.WebsocketURL(), err)
		}
	}
}
