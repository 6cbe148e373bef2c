package system

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"

	"github.com/qubesbus/qubesbus/bus/audit"
	"github.com/qubesbus/qubesbus/bus/cloudevent"
	"github.com/qubesbus/qubesbus/bus/envelope"
	"github.com/qubesbus/qubesbus/bus/lease"
	"github.com/qubesbus/qubesbus/bus/rpc"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/access"
	"github.com/qubesbus/qubesbus/schemas/adminapi"
	"github.com/qubesbus/qubesbus/schemas/changelog"
	"github.com/qubesbus/qubesbus/schemas/config"
	"github.com/qubesbus/qubesbus/schemas/configstore"
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
// role (each service's own, storage, devices and backup included, the readers', the
// lab's) is refused when it publishes a call on an API subject, and the call has no
// effect; the events role cannot call either, and only the lab role (besides the
// hypervisor's own and the storage's faults) reaches the fault-injection subjects.
func TestOnlyTheGatewayCalls(t *testing.T) {
	sys := startSystem(t)
	host := subject.ForHost("test")
	spoof := (&envelope.Request{Method: "admin.vm.property.Set", Source: "dom0", Dest: "work", Arg: "label",
		Payload: []byte("red"), ID: "spoofed"}).Msg(host.API("admin.vm.property.Set"))
	for _, r := range access.Roles {
		if r.Name == access.Gateway || r.Name == access.Admin {
			continue
		}
		t.Run(r.Name, func(t *testing.T) { expectRefused(t, connectAs(t, sys, r.Name), spoof) })
	}
	if got := roundTrip(t, sys.Socket, []byte("admin.vm.property.Get+label dom0 name work\x00")); string(got) != "0\x00default=False type=label blue" {
		t.Fatalf("a spoofed call changed the label: %q", got)
	}

	// The lab's faults: the lab role may inject them; no other role but the admin may.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	lab := simdriver.LabClient{NC: connectAs(t, sys, access.Lab), Host: host}
	if _, err := lab.Domains(ctx); err != nil {
		t.Fatalf("lab role: %v", err)
	}
	for _, r := range access.Roles {
		if r.Name == access.Lab || r.Name == access.Admin {
			continue
		}
		t.Run("lab/"+r.Name, func(t *testing.T) {
			expectRefused(t, connectAs(t, sys, r.Name), nats.NewMsg(host.Lab(simdriver.LabOpCrash)))
		})
	}
}

// canSubscribe reports whether a role's permissions let it subscribe to subj.
func canSubscribe(r access.Role, subj string) bool {
	for _, allow := range r.Permissions().Subscribe.Allow {
		if server.SubjectMatchesFilter(subj, allow) {
			return true
		}
	}
	return false
}

// TestServicesHearOnlyTheirOwnMethods: each service's role may subscribe to the API
// subjects of the methods the registry gives it, and to no other method's: a service
// (storage, devices, backup as much as the others) neither reads the calls of
// another, payloads included, nor answers them in its place. Calls of unknown methods
// and the checks of admin.Events go to properties, which resolves them. Live: a
// subscription outside a role's methods is refused by the server.
func TestServicesHearOnlyTheirOwnMethods(t *testing.T) {
	hearer := func(m rpc.Method) string {
		if m.Service == rpc.Gateway {
			return access.Properties
		}
		return string(m.Service)
	}
	methods := adminapi.Registry.Methods()
	methods = append(methods, rpc.Method{Name: subject.UnknownMethod, Service: rpc.Properties})
	for _, m := range methods {
		subj := subject.ForHost("test").API(m.Name)
		for _, r := range access.Roles {
			if r.Name == access.Admin {
				continue
			}
			if got, want := canSubscribe(r, subj), r.Name == hearer(m); got != want {
				t.Errorf("%s: role %s may subscribe: %v, want %v", m.Name, r.Name, got, want)
			}
		}
	}

	sys := startSystem(t)
	for _, c := range []struct{ role, subj string }{
		{access.Storage, "qubes.v1.test.api.admin.vm.property.Get"},
		{access.Devices, "qubes.v1.*.api.>"},
		{access.Backup, "qubes.v1.test.api.admin.vm.notes.Set"},
		{access.Properties, "qubes.v1.test.api.admin.backup.Execute"},
		{access.VMLifecycle, "qubes.v1.test.api.admin.vm.firewall.Set"},
	} {
		expectSubscribeRefused(t, connectAs(t, sys, c.role), c.subj)
	}
}

// expectSubscribeRefused subscribes to subj as nc and waits for the server to refuse.
func expectSubscribeRefused(t *testing.T, nc *nats.Conn, subj string) {
	t.Helper()
	denied := make(chan error, 4)
	nc.SetErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) { denied <- err })
	sub, err := nc.SubscribeSync(subj)
	if err != nil {
		t.Fatalf("subscribe %s: %v", subj, err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-denied:
		if !errors.Is(err, nats.ErrPermissionViolation) {
			t.Errorf("%s on %s: %v, want a permissions violation", nc.Opts.Name, subj, err)
		}
	case <-time.After(time.Minute):
		t.Errorf("%s could subscribe to %s", nc.Opts.Name, subj)
	}
}

// TestStreamsStayWithTheirRoles: no role but the auditor (and the admin) reads the
// audit trail, services and the gateway included; no role but the admin deletes or
// purges the audit or events stream, the configuration store included; and every role
// that keeps a replica of the configuration may read single records of the change log
// from the stream leader, as the replica does to catch up while its consumer lags (a
// failover), not only through its consumer.
func TestStreamsStayWithTheirRoles(t *testing.T) {
	sys := startSystem(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for _, r := range access.Roles {
		if r.Name == access.Auditor || r.Name == access.Admin {
			continue
		}
		t.Run("audit/"+r.Name, func(t *testing.T) {
			nc := connectAs(t, sys, r.Name)
			denied := make(chan error, 4)
			nc.SetErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) { denied <- err })
			js, _ := jetstream.New(nc)
			cctx, ccancel := context.WithTimeout(ctx, 2*time.Second)
			_, err := js.OrderedConsumer(cctx, audit.StreamName, jetstream.OrderedConsumerConfig{})
			ccancel()
			if err == nil {
				t.Fatalf("%s opened a consumer on %s", r.Name, audit.StreamName)
			}
			select {
			case perr := <-denied:
				if !errors.Is(perr, nats.ErrPermissionViolation) {
					t.Errorf("%v, want a permissions violation", perr)
				}
			case <-time.After(time.Minute):
				t.Errorf("no permissions violation (consumer: %v)", err)
			}
		})
	}
	for _, role := range []string{access.Persistence, access.Properties, access.Storage, access.Devices, access.Gateway} {
		for _, stream := range []string{audit.StreamName, cloudevent.StreamName} {
			for _, op := range []string{"DELETE", "PURGE"} {
				expectRefused(t, connectAs(t, sys, role), nats.NewMsg("$JS.API.STREAM."+op+"."+stream))
			}
		}
	}
	aj, _ := jetstream.New(connectAs(t, sys, access.Admin))
	for _, stream := range []string{audit.StreamName, cloudevent.StreamName} {
		if _, err := aj.Stream(ctx, stream); err != nil {
			t.Errorf("%s after the refused deletions: %v", stream, err)
		}
	}

	for _, role := range []string{access.Persistence, access.Properties, access.VMLifecycle, access.Storage, access.Devices, access.Backup, access.WebView} {
		js, _ := jetstream.New(connectAs(t, sys, role))
		rctx, rcancel := context.WithTimeout(ctx, 10*time.Second)
		l, err := changelog.Attach(rctx, js, subject.ForHost("test"))
		if err == nil {
			_, err = l.Next(rctx, 1)
		}
		rcancel()
		if err != nil {
			t.Errorf("%s reading the change log from the leader: %v", role, err)
		}
	}
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

// TestServeWithTheRunsKeys: `qubesbus serve <service>` against the TCP port of a
// `qubesbus run`, with the role's key from its key dir, starts within seconds for
// every role, also those that may not read every stream's info (the gateway, the
// hypervisor): it leaves the streams to the run that made them instead of waiting for
// answers its role never gets. The extra gateway serves calls on its own socket.
func TestServeWithTheRunsKeys(t *testing.T) {
	sys := startSystem(t)
	keys := filepath.Join(filepath.Dir(sys.Socket), "data", "nkeys")
	log := slog.New(slog.DiscardHandler)
	for _, c := range []struct{ name, host string }{{"gateway", "test"}, {"hypervisor", "other"}, {"persistence", "other"}} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			cfg := Config{Socket: filepath.Join(dir, "qubesd.sock"), DataDir: filepath.Join(dir, "data"), NKeyDir: keys,
				QubesXML: filepath.Join(repoTestdata, "qubes.xml"), HostID: c.host, NATSURL: sys.NATSURL}
			ctx, cancel := context.WithTimeout(context.Background(), 8*time.Second)
			defer cancel()
			one, err := StartService(ctx, c.name, cfg, log)
			if err != nil {
				t.Fatalf("serve %s with its key: %v", c.name, err)
			}
			defer func() { _ = one.Stop() }()
			if c.name == "gateway" {
				if got := roundTrip(t, cfg.Socket, []byte("admin.vm.property.Get+label dom0 name work\x00")); string(got) != "0\x00default=False type=label blue" {
					t.Fatalf("call through the served gateway: %q", got)
				}
			}
		})
	}
}

// TestServiceDurablesStayWithTheirOwners: storage and devices keep durable consumers of
// QUBES_EVENTS (power states). The roles that may open consumers of their own on that
// stream (the readers, the gateway, the other service) may not delete, change or pull
// from them: a read-only events credential could otherwise stop storage following
// power states until a restart. The durables are still there afterwards.
func TestServiceDurablesStayWithTheirOwners(t *testing.T) {
	sys := startSystem(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	admin, _ := jetstream.New(connectAs(t, sys, access.Admin))
	for _, d := range access.EventDurables("test") {
		if _, err := admin.Consumer(ctx, cloudevent.StreamName, d[1]); err != nil {
			t.Fatalf("%s's durable %s: %v (named differently by the service?)", d[0], d[1], err)
		}
		for _, role := range []string{access.Events, access.WebView, access.Gateway, access.Storage, access.Devices} {
			if role == d[0] {
				continue
			}
			t.Run(role+"/"+d[1], func(t *testing.T) {
				nc := connectAs(t, sys, role)
				for _, op := range []string{"DELETE", "INFO", "MSG.NEXT"} {
					expectRefused(t, nc, nats.NewMsg("$JS.API.CONSUMER."+op+"."+cloudevent.StreamName+"."+d[1]))
				}
				expectRefused(t, nc, nats.NewMsg("$JS.API.CONSUMER.CREATE."+cloudevent.StreamName+"."+d[1]+".qubes.v1.test.events.>"))
			})
		}
		if _, err := admin.Consumer(ctx, cloudevent.StreamName, d[1]); err != nil {
			t.Errorf("%s after the refused requests: %v", d[1], err)
		}
	}
	// Their owners still follow power states: a start makes storage prepare volumes.
	if got := roundTrip(t, sys.Socket, []byte("admin.vm.Start+ dom0 name work\x00")); string(got) != "0\x00" {
		t.Fatalf("start: %q", got)
	}
}

// TestEveryServiceConnectsAsItsRole: in `qubesbus run` each service's connection (and
// the web view's) is authenticated with its own role's key, none with the admin's: the
// server's own account of its clients says so.
func TestEveryServiceConnectsAsItsRole(t *testing.T) {
	sys := startSystem(t)
	pub := map[string]string{} // public key → role
	for _, r := range access.Roles {
		seed, err := os.ReadFile(access.SeedFile(filepath.Join(filepath.Dir(sys.Socket), "data", "nkeys"), r.Name))
		if err != nil {
			t.Fatal(err)
		}
		kp, err := nkeys.FromSeed([]byte(strings.TrimSpace(string(seed))))
		if err != nil {
			t.Fatal(err)
		}
		p, _ := kp.PublicKey()
		pub[p] = r.Name
	}
	connz, err := sys.NATS.Connz(&server.ConnzOptions{Username: true, Limit: 1000})
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for _, c := range connz.Conns {
		name, _ := strings.CutSuffix(strings.TrimPrefix(c.Name, "qubesbus-"), "-test")
		role, ok := pub[c.AuthorizedUser]
		if !ok {
			t.Errorf("connection %q authenticated as %q, no role's key", c.Name, c.AuthorizedUser)
			continue
		}
		if _, isRole := access.Find(name); isRole && role != name {
			t.Errorf("connection %q is the %s role, want %s", c.Name, role, name)
		}
		seen[role] = true
	}
	for _, svc := range Services {
		if !seen[svc] {
			t.Errorf("no connection of %s as its role (connections: %d)", svc, len(connz.Conns))
		}
	}
	if seen[access.Admin] {
		t.Error("a connection of the running system is the admin")
	}
}

// TestServicesChangeOnlyWhatTheyOwn: each service sends configuration changes only
// under its own name, and persistence applies only what that name owns: storage,
// taken over, can neither pose as properties on the bus nor change a feature through
// its own apply subject, and the refused batch leaves the configuration as it was.
func TestServicesChangeOnlyWhatTheyOwn(t *testing.T) {
	sys := startSystem(t)
	host := subject.ForHost("test")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, r := range access.Roles {
		if r.Name == access.Admin || r.Name == access.Persistence {
			continue
		}
		other := access.Properties
		if r.Name == access.Properties {
			other = access.Storage
		}
		t.Run(r.Name, func(t *testing.T) {
			expectRefused(t, connectAs(t, sys, r.Name), nats.NewMsg(configstore.ApplySubject(host, other)))
		})
	}

	storage := configstore.Client{NC: connectAs(t, sys, access.Storage), Host: host, Caller: access.Storage}
	snap, err := storage.Snapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var work config.Domain
	for _, d := range snap.Config.Domains {
		if d.Name() == "work" {
			work = d
		}
	}
	if work.ID == "" {
		t.Fatal("no qube work in the fixture")
	}
	for _, m := range []config.Mutation{
		{Ops: []config.Op{{Kind: config.OpSetFeature, Domain: work.ID, Name: "taken", Value: "1"}}},
		// One op of its own does not carry one that is not.
		{Ops: []config.Op{{Kind: config.OpSetVolumeConfig, Domain: work.ID, Value: ""},
			{Kind: config.OpSetProperty, Domain: work.ID, Name: "netvm", Value: ""}}},
	} {
		if _, err := storage.Apply(ctx, m); !errors.Is(err, configstore.ErrNotPermitted) || !errors.Is(err, configstore.ErrRejected) {
			t.Fatalf("storage applied %v: %v, want ErrNotPermitted", m.Ops, err)
		}
	}
	after, err := storage.Snapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if after.Revision != snap.Revision {
		t.Fatalf("refused changes moved the configuration from revision %d to %d", snap.Revision, after.Revision)
	}
	if got := roundTrip(t, sys.Socket, []byte("admin.vm.feature.Get+taken dom0 name work\x00")); string(got) != "2\x00QubesFeatureNotFoundError\x00\x00Feature not set for domain work: taken\x00" {
		t.Fatalf("feature taken after the refusal: %q", got)
	}
}
