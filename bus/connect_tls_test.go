package bus_test

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/bustest"
)

// A server that requires TLS and verifies clients accepts a service that brings the CA
// and its certificate, and refuses one without either.
func TestConnectWithTLS(t *testing.T) {
	dir := t.TempDir()
	ca, srvCert, srvKey, cliCert, cliKey := bustest.PKI(t, dir)
	tc, err := server.GenTLSConfig(&server.TLSConfigOpts{CertFile: srvCert, KeyFile: srvKey, CaFile: ca, Verify: true})
	if err != nil {
		t.Fatal(err)
	}
	ns, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, NoLog: true, NoSigs: true,
		TLS: true, TLSVerify: true, TLSConfig: tc, TLSTimeout: 2})
	if err != nil {
		t.Fatal(err)
	}
	go ns.Start()
	t.Cleanup(ns.Shutdown)
	if !ns.ReadyForConnections(10 * time.Second) {
		t.Fatal("server not ready")
	}
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
