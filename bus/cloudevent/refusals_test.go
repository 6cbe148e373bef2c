package cloudevent

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"

	"github.com/qubesbus/qubesbus/bus/embedded"
	"github.com/qubesbus/qubesbus/bus/subject"
)

// A publish the server refuses (a permission the connection lacks) fails its caller
// at once with ErrRefused: no ack ever answers it, and the caller would otherwise
// wait until its context ends. The connection's own error handler still hears the
// refusal, and events it may publish are stored as before, also after a refusal.
func TestRefusedPublishFailsAtOnce(t *testing.T) {
	denied := subject.ForHost("local").Event("work", "domain-start")
	admin, limited := newUser(t), newUser(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ns, err := embedded.Start(ctx, embedded.Config{StoreDir: t.TempDir(), Port: -1, Users: []*server.NkeyUser{
		{Nkey: admin.pub},
		{Nkey: limited.pub, Permissions: &server.Permissions{Publish: &server.SubjectPermission{
			Allow: []string{">"}, Deny: []string{denied}}}},
	}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Shutdown(); ns.WaitForShutdown() })
	ajs, _ := jetstream.New(admin.connect(t, ns, nil))
	s, err := EnsureStream(ctx, ajs, StreamConfig{})
	if err != nil {
		t.Fatal(err)
	}

	heard := make(chan error, 8)
	nc := limited.connect(t, ns, func(_ *nats.Conn, _ *nats.Subscription, err error) { heard <- err })
	js, _ := jetstream.New(nc)
	p := NewPublisher(js, "local")
	// Deadlines far beyond what the refusal takes: meeting one is the failure.
	long, cancelLong := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancelLong()
	for _, events := range [][]Event{
		{New("work", "domain-start", "start_guid", "True")},
		{New("work", "domain-pre-start"), New("work", "domain-start", "start_guid", "True")},
	} {
		err := p.Publish(long, events...)
		if !errors.Is(err, ErrRefused) || !errors.Is(err, ErrPublish) || !errors.Is(err, nats.ErrPermissionViolation) {
			t.Fatalf("publish of %d events with a refused one: %v, want ErrRefused", len(events), err)
		}
		select {
		case err := <-heard:
			if !errors.Is(err, nats.ErrPermissionViolation) {
				t.Fatalf("the connection's handler heard %v", err)
			}
		case <-long.Done():
			t.Fatal("the connection's own error handler no longer hears refusals")
		}
	}
	if err := p.Publish(long, New("work", "domain-pre-start")); err != nil {
		t.Fatalf("an allowed event after the refusals: %v", err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.State.Msgs != 2 {
		t.Fatalf("the stream holds %d events, want the 2 allowed ones", info.State.Msgs)
	}
}

type user struct {
	pub string
	kp  nkeys.KeyPair
}

func newUser(t *testing.T) user {
	kp, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := kp.PublicKey()
	return user{pub: pub, kp: kp}
}

func (u user) connect(t *testing.T, ns *server.Server, onErr nats.ErrHandler) *nats.Conn {
	t.Helper()
	opts := []nats.Option{nats.Nkey(u.pub, u.kp.Sign)}
	if onErr != nil {
		opts = append(opts, nats.ErrorHandler(onErr))
	}
	nc, err := nats.Connect(ns.ClientURL(), opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return nc
}
