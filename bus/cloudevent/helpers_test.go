package cloudevent

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus/bustest"
)

// withStream runs a JetStream server with QUBES_EVENTS and returns a context that
// ends after timeout (or with the test), a connection, the stream and a publisher of
// host "local" on that connection.
func withStream(t *testing.T, timeout time.Duration) (context.Context, *nats.Conn, jetstream.Stream, *Publisher) {
	t.Helper()
	nc := bustest.Connect(t, bustest.RunJetStream(t))
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	t.Cleanup(cancel)
	s, err := EnsureStream(ctx, js, StreamConfig{})
	if err != nil {
		t.Fatal(err)
	}
	return ctx, nc, s, NewPublisher(js, "local")
}

func rawToMsg(m *jetstream.RawStreamMsg) *nats.Msg {
	return &nats.Msg{Subject: m.Subject, Header: m.Header, Data: m.Data}
}
