package lease

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus/bustest"
)

// ttl is short so that the tests take no longer than the events they wait for
// (renewals every ttl/4, expiry, step-down after 2*ttl); production uses DefaultTTL.
const ttl = 500 * time.Millisecond

func bucket(t *testing.T) jetstream.KeyValue {
	t.Helper()
	return bucketOn(t, bustest.RunJetStream(t))
}

func bucketOn(t *testing.T, ns *server.Server) jetstream.KeyValue {
	t.Helper()
	js, err := jetstream.New(bustest.Connect(t, ns))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	kv, err := Open(ctx, js, ttl, 1)
	if err != nil {
		t.Fatal(err)
	}
	if again, err := Open(ctx, js, ttl, 1); err != nil || again.Bucket() != Bucket {
		t.Fatalf("opening an existing bucket: %v", err)
	}
	return kv
}

// acquireAsync contends for the lease in the background.
func acquireAsync(ctx context.Context, l *Lease) <-chan *Term {
	ch := make(chan *Term, 1)
	go func() {
		term, err := l.Acquire(ctx)
		if err != nil {
			close(ch)
			return
		}
		ch <- term
	}()
	return ch
}

func TestOneHolderAtATime(t *testing.T) {
	kv := bucket(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	a, err := New(kv, "vmlifecycle.h1", "a", ttl, nil).Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// b waits while a renews, well past the TTL.
	bctx, bcancel := context.WithTimeout(ctx, 3*ttl)
	defer bcancel()
	if _, err := New(kv, "vmlifecycle.h1", "b", ttl, nil).Acquire(bctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("b acquired a held lease: %v", err)
	}
	if a.Context().Err() != nil {
		t.Fatalf("a's term ended while it renewed: %v", context.Cause(a.Context()))
	}
	// Another role is independent.
	other, err := New(kv, "vmlifecycle.h2", "b", ttl, nil).Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// A released lease goes to the waiting instance at once, in a later epoch.
	bch := acquireAsync(ctx, New(kv, "vmlifecycle.h1", "b", ttl, nil))
	if err := a.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if a.Context().Err() == nil {
		t.Fatal("released term still live")
	}
	b := <-bch
	if b == nil {
		t.Fatal("b never acquired the released lease")
	}
	if b.Epoch <= a.Epoch || b.Epoch <= other.Epoch {
		t.Fatalf("epochs do not order terms: a %d, other %d, b %d", a.Epoch, other.Epoch, b.Epoch)
	}
}

// A holder that dies without releasing stops renewing; the lease expires and the
// standby takes over.
func TestDeadHolderExpires(t *testing.T) {
	kv := bucket(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	actx, die := context.WithCancel(ctx)
	a, err := New(kv, "vmlifecycle.h1", "a", ttl, nil).Acquire(actx)
	if err != nil {
		t.Fatal(err)
	}
	bch := acquireAsync(ctx, New(kv, "vmlifecycle.h1", "b", ttl, nil))
	die() // like kill -9: no release
	b := <-bch
	if b == nil || b.Epoch <= a.Epoch {
		t.Fatalf("standby did not take over after expiry: %+v", b)
	}
}

// A holder whose key was taken (an operator reset it, or it expired during a long
// pause) ends its term with ErrLost rather than carry on beside the new holder.
func TestHolderStepsDownWhenTheKeyIsTaken(t *testing.T) {
	kv := bucket(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	a, err := New(kv, "vmlifecycle.h1", "a", ttl, nil).Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(ctx, "vmlifecycle.h1", []byte("intruder")); err != nil {
		t.Fatal(err)
	}
	select {
	case <-a.Context().Done():
		if cause := context.Cause(a.Context()); !errors.Is(cause, ErrLost) {
			t.Fatalf("term ended with %v, want ErrLost", cause)
		}
	case <-ctx.Done():
		t.Fatal("holder never noticed it lost the lease")
	}
}

// A holder that cannot renew (its NATS server is gone) ends its term with ErrLost once
// no renewal has succeeded for twice the TTL, rather than carry on unsure.
func TestHolderStepsDownWhenItCannotRenew(t *testing.T) {
	ns := bustest.RunJetStream(t)
	kv := bucketOn(t, ns)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	a, err := New(kv, "vmlifecycle.h1", "a", ttl, nil).Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ns.Shutdown()
	select {
	case <-a.Context().Done():
		if cause := context.Cause(a.Context()); !errors.Is(cause, ErrLost) {
			t.Fatalf("term ended with %v, want ErrLost", cause)
		}
	case <-ctx.Done():
		t.Fatal("holder kept its term with no renewal")
	}
}

// A renewal that the server stored but whose acknowledgement came too late leaves the
// holder with an old revision; its next renewal conflicts. The key still names the
// holder, so the term goes on (it used to end, and a loaded host lost and retook its
// lease over and over). Here the late renewal is written by the test, with the
// holder's name, as the server would have stored it.
func TestLateRenewalKeepsTheTerm(t *testing.T) {
	kv := bucket(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	const key = "vmlifecycle.h1"
	a, err := New(kv, key, "a", ttl, nil).Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	w, err := kv.Watch(ctx, key, jetstream.UpdatesOnly())
	if err != nil {
		t.Fatal(err)
	}
	defer w.Stop()
	var late uint64
	for late == 0 {
		e, err := kv.Get(ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		// The holder may renew between the Get and the Update: try again then.
		if rev, err := kv.Update(ctx, key, []byte("a"), e.Revision()); err == nil {
			late = rev
		}
	}
	// The term goes on: a renewal after the late one, by the holder, shows up.
	for {
		select {
		case e := <-w.Updates():
			if e != nil && e.Revision() > late {
				if string(e.Value()) != "a" {
					t.Fatalf("key after the late renewal: %q", e.Value())
				}
				if a.Context().Err() != nil {
					t.Fatalf("term ended: %v", context.Cause(a.Context()))
				}
				return
			}
		case <-a.Context().Done():
			t.Fatalf("term ended after a late renewal: %v", context.Cause(a.Context()))
		case <-ctx.Done():
			t.Fatal("no renewal after the late one")
		}
	}
}
