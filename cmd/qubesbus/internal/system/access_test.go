package system

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"

	"github.com/qubesbus/qubesbus/bus/envelope"
	"github.com/qubesbus/qubesbus/bus/lease"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/access"
	"github.com/qubesbus/qubesbus/services/vmlifecycle/simdriver"
)

// TestNoTCPListenerByDefault: without --nats-port the embedded server takes no TCP
// client at all; the services still serve (in-process).
func TestNoTCPListenerByDefault(t *testing.T) {
	sys := startSystem(t, func(c *Config) { c.NATSPort = 0 })
	if addr := sys.NATS.Addr(); addr != nil {
		t.Fatalf("embedded NATS listens on %v", addr)
	}
	if got := roundTrip(t, sys.Socket, []byte("admin.vm.property.Get+label dom0 name work\x00")); string(got) != "0\x00default=False type=label blue" {
		t.Fatalf("call over the socket: %q", got)
	}
	for _, r := range access.Roles {
		st, err := os.Stat(access.SeedFile(filepath.Join(filepath.Dir(sys.Socket), "data", "nkeys"), r.Name))
		if err != nil || st.Mode().Perm() != 0o600 {
			t.Errorf("key of %s: %v %v", r.Name, st, err)
		}
	}
}

// TestUnauthenticatedClientsRefused: on the TCP port, a client without a key, or with
// a key the server does not know, is refused; a role's key is accepted.
func TestUnauthenticatedClientsRefused(t *testing.T) {
	sys := startSystem(t)
	if nc, err := nats.Connect(sys.NATSURL, nats.MaxReconnects(0)); err == nil {
		nc.Close()
		t.Fatal("a client without credentials got onto the bus")
	} else if !errors.Is(err, nats.ErrAuthorization) && !strings.Contains(strings.ToLower(err.Error()), "authorization") {
		t.Fatalf("refusal: %v", err)
	}
	stranger, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	seed, _ := stranger.Seed()
	file := filepath.Join(t.TempDir(), "stranger.nk")
	if err := os.WriteFile(file, seed, 0o600); err != nil {
		t.Fatal(err)
	}
	opt, err := nats.NkeyOptionFromSeed(file)
	if err != nil {
		t.Fatal(err)
	}
	if nc, err := nats.Connect(sys.NATSURL, opt, nats.MaxReconnects(0)); err == nil {
		nc.Close()
		t.Fatal("an unknown key got onto the bus")
	}
	opt, err = nats.NkeyOptionFromSeed(access.SeedFile(sys.cfg.NKeyDir, access.Events))
	if err != nil {
		t.Fatal(err)
	}
	nc, err := nats.Connect(sys.NATSURL, opt, nats.MaxReconnects(0))
	if err != nil {
		t.Fatalf("events role over TCP: %v", err)
	}
	nc.Close()
}

// TestOnlyTheGatewayCalls: Qubes-Source is trusted only from the gateway. Every other
// role, a service's own included, is refused when it publishes a call on an API
// subject, and the call has no effect; the events role cannot call either, and only
// the lab role (besides the hypervisor's own) reaches the fault-injection subjects.
func TestOnlyTheGatewayCalls(t *testing.T) {
	sys := startSystem(t)
	host := subject.ForHost("test")
	spoof := (&envelope.Request{Method: "admin.vm.property.Set", Source: "dom0", Dest: "work", Arg: "label",
		Payload: []byte("red"), ID: "spoofed"}).Msg(host.API("admin.vm.property.Set"))
	for _, role := range []string{access.Properties, access.VMLifecycle, access.Persistence, access.Hypervisor, access.Events, access.Lab, access.WebView} {
		expectRefused(t, connectAs(t, sys, role), spoof)
	}
	if got := roundTrip(t, sys.Socket, []byte("admin.vm.property.Get+label dom0 name work\x00")); string(got) != "0\x00default=False type=label blue" {
		t.Fatalf("a spoofed call changed the label: %q", got)
	}

	// The lab's faults: the lab role may inject them, the events role may not.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	lab := simdriver.LabClient{NC: connectAs(t, sys, access.Lab), Host: host}
	if _, err := lab.Domains(ctx); err != nil {
		t.Fatalf("lab role: %v", err)
	}
	expectRefused(t, connectAs(t, sys, access.Events), nats.NewMsg(host.Lab(simdriver.LabOpCrash)))
}

// expectRefused publishes msg as nc and waits for the server to report the
// permissions violation (asynchronously, on the connection's error handler).
func expectRefused(t *testing.T, nc *nats.Conn, msg *nats.Msg) {
	t.Helper()
	denied := make(chan error, 4)
	nc.SetErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) { denied <- err })
	if err := nc.PublishMsg(msg); err != nil {
		t.Fatalf("publish %s: %v", msg.Subject, err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatalf("flush: %v", err)
	}
	select {
	case err := <-denied:
		if !errors.Is(err, nats.ErrPermissionViolation) {
			t.Errorf("%s: %v, want a permissions violation", msg.Subject, err)
		}
	case <-time.After(time.Minute):
		t.Errorf("publishing on %s was not refused", msg.Subject)
	}
}

// TestRepliesStayWithTheirRole: a role receives replies only on its own inbox prefix;
// the events, auditor and lab roles cannot subscribe to the replies of other roles'
// requests (the gateway's calls, say), and no service may publish on inboxes at
// large, only answer the requests it received.
func TestRepliesStayWithTheirRole(t *testing.T) {
	sys := startSystem(t)
	for _, role := range []string{access.Events, access.Auditor, access.Lab, access.Properties} {
		nc := connectAs(t, sys, role)
		for _, subj := range []string{"_INBOX.>", access.InboxPrefix(access.Gateway) + ".>"} {
			denied := make(chan error, 4)
			nc.SetErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) { denied <- err })
			sub, err := nc.SubscribeSync(subj)
			if err != nil {
				t.Fatalf("%s: subscribe %s: %v", role, subj, err)
			}
			if err := nc.Flush(); err != nil {
				t.Fatal(err)
			}
			select {
			case err := <-denied:
				if !errors.Is(err, nats.ErrPermissionViolation) {
					t.Errorf("%s on %s: %v, want a permissions violation", role, subj, err)
				}
			case <-time.After(time.Minute):
				t.Errorf("%s could subscribe to %s", role, subj)
			}
			_ = sub.Unsubscribe()
		}
	}
	expectRefused(t, connectAs(t, sys, access.Properties), nats.NewMsg(access.InboxPrefix(access.Gateway)+".x"))
	// The gateway's own calls still get their replies.
	if got := roundTrip(t, sys.Socket, []byte("admin.vm.property.Get+label dom0 name work\x00")); string(got) != "0\x00default=False type=label blue" {
		t.Fatalf("call over the socket: %q", got)
	}
}

// TestStandbyMayAskForTheLease: a second lifecycle instance, as the vmlifecycle role,
// tries to take the host's lease that the first holds. The client reads the key to
// tell a taken key from a deleted one; the role may do that, so the standby learns
// the lease is held (a conflict) and the server reports no permissions violation.
func TestStandbyMayAskForTheLease(t *testing.T) {
	sys := startSystem(t)
	nc := connectAs(t, sys, access.VMLifecycle)
	violations := make(chan error, 8)
	nc.SetErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) { violations <- err })
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	kv, err := js.KeyValue(ctx, lease.Bucket)
	if err != nil {
		t.Fatalf("lease bucket as vmlifecycle: %v", err)
	}
	_, err = kv.Create(ctx, leaseKey(subject.ForHost("test")), []byte("standby"))
	if !errors.Is(err, jetstream.ErrKeyExists) {
		t.Fatalf("create of a held lease: %v, want ErrKeyExists", err)
	}
	// The violation, if any, reaches the error handler after a round trip; a flush
	// is one more round trip, so it would have arrived by then.
	if err := nc.FlushWithContext(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-violations:
		t.Fatalf("vmlifecycle role: %v", err)
	default:
	}
}
