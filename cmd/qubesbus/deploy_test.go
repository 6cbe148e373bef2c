package main

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

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/bus/cloudevent"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/access"
	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/system"
)

// runDeployServer starts nats-server from deploy/nats/single.conf (ports and store moved
// to test places), with the users' passwords from the environment. With tls, the
// config's TLS block is switched on, pointing at tls's files.
func runDeployServer(t *testing.T, tls *bus.TLSFiles, serverCert, serverKey string) *server.Server {
	t.Helper()
	for _, r := range access.Roles {
		t.Setenv("QUBESBUS_"+strings.ToUpper(r.Name)+"_PASSWORD", "pw-"+r.Name)
	}
	conf := "../../deploy/nats/single.conf"
	if tls != nil {
		raw, err := os.ReadFile(conf)
		if err != nil {
			t.Fatal(err)
		}
		// include is relative to the config's directory: the users come along.
		dir := t.TempDir()
		perms, err := os.ReadFile("../../deploy/nats/permissions.conf")
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "permissions.conf"), perms, 0o600); err != nil {
			t.Fatal(err)
		}
		text := string(raw)
		// Uncomment the TLS block, with this test's files.
		var out []string
		inTLS := false
		for _, line := range strings.Split(text, "\n") {
			if strings.HasPrefix(line, "# tls {") {
				inTLS = true
			}
			if inTLS {
				line = strings.TrimPrefix(line, "# ")
				line = strings.NewReplacer("/etc/qubesbus/tls/server.pem", serverCert,
					"/etc/qubesbus/tls/server-key.pem", serverKey, "/etc/qubesbus/tls/ca.pem", tls.CA).Replace(line)
				if line == "}" {
					inTLS = false
				}
			}
			out = append(out, line)
		}
		conf = filepath.Join(dir, "single.conf")
		if err := os.WriteFile(conf, []byte(strings.Join(out, "\n")), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	opts, err := server.ProcessConfigFile(conf)
	if err != nil {
		t.Fatalf("deploy config: %v", err)
	}
	if tls != nil && opts.TLSConfig == nil {
		t.Fatal("the TLS block of single.conf did not switch TLS on")
	}
	opts.Port, opts.HTTPPort, opts.StoreDir, opts.NoSigs = -1, 0, t.TempDir(), true
	ns, err := server.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	go ns.Start()
	if !ns.ReadyForConnections(10 * time.Second) {
		t.Fatal("server not ready")
	}
	t.Cleanup(func() { ns.Shutdown(); ns.WaitForShutdown() })
	return ns
}

// connectAs returns a connection whose permission errors land in errs.
func connectAs(t *testing.T, ns *server.Server, user string, errs chan<- error) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(ns.ClientURL(), nats.UserInfo(user, "pw-"+user), nats.CustomInboxPrefix(access.InboxPrefix(user)),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) { errs <- err }))
	if err != nil {
		t.Fatalf("connect as %s: %v", user, err)
	}
	t.Cleanup(nc.Close)
	return nc
}

func TestServiceCredentialsCoverOnlyTheirOwnEvents(t *testing.T) {
	ns := runDeployServer(t, nil, "", "")
	errs := make(chan error, 16)
	admin := connectAs(t, ns, "admin", errs)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ajs, _ := jetstream.New(admin)
	if _, err := cloudevent.EnsureStream(ctx, ajs, cloudevent.StreamConfig{}); err != nil {
		t.Fatal(err)
	}
	host := "local"
	tests := []struct {
		user  string
		event cloudevent.Event
		ok    bool
	}{
		{"properties", cloudevent.New("work", "property-set:netvm", "name", "netvm", "newvalue", "sys-net"), true},
		{"properties", cloudevent.New("", "domain-add", "vm", "newvm"), true},
		{"properties", cloudevent.New("work", "domain-start", "start_guid", "True"), false},
		{"properties", cloudevent.New("work", "domain-shutdown"), false},
		{"vmlifecycle", cloudevent.New("work", "domain-start", "start_guid", "True"), true},
		{"vmlifecycle", cloudevent.New("work", "property-reset:xid", "name", "xid"), true},
		{"vmlifecycle", cloudevent.New("work", "property-set:netvm", "name", "netvm", "newvalue", "x"), false},
		{"vmlifecycle", cloudevent.New("", "domain-add", "vm", "x"), false},
		{"gateway", cloudevent.New("work", "domain-start", "start_guid", "True"), false},
		{"events", cloudevent.New("work", "property-set:label", "name", "label", "newvalue", "red"), false},
	}
	for _, tt := range tests {
		t.Run(tt.user+"/"+tt.event.Name, func(t *testing.T) {
			uerrs := make(chan error, 16)
			nc := connectAs(t, ns, tt.user, uerrs)
			js, _ := jetstream.New(nc)
			pctx, pcancel := context.WithTimeout(ctx, time.Second)
			defer pcancel()
			err := cloudevent.NewPublisher(js, host).Publish(pctx, tt.event)
			if tt.ok {
				if err != nil {
					t.Fatalf("own event refused: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("%s published %s", tt.user, subject.ForHost(host).Event(tt.event.VM, tt.event.Name))
			}
			select {
			case perr := <-uerrs:
				if !errors.Is(perr, nats.ErrPermissionViolation) && !strings.Contains(perr.Error(), "Permissions Violation") {
					t.Fatalf("error %v is not a permissions violation", perr)
				}
			case <-time.After(5 * time.Second):
				t.Fatalf("no permissions violation reported (publish err %v)", err)
			}
		})
	}
	// The refused events never reached the stream.
	s, err := ajs.Stream(ctx, cloudevent.StreamName)
	if err != nil {
		t.Fatal(err)
	}
	if n := s.CachedInfo().State.Msgs; n != 4 {
		t.Fatalf("stream holds %d events, want the 4 allowed ones", n)
	}
}

// TestServicesRunWithTheirOwnCredentials runs every service as its deploy user (serve
// mode, one connection each) and makes calls through the gateway: the permissions in
// deploy/nats cover everything the services do.
// The same runs over TLS, with single.conf's TLS block switched on (the server
// verifies client certificates).
func TestServicesRunWithTheirOwnCredentials(t *testing.T) {
	t.Run("plain", func(t *testing.T) { servicesAsOwnUsers(t, nil, "", "") })
	t.Run("tls", func(t *testing.T) {
		ca, srvCert, srvKey, cliCert, cliKey := bustest.PKI(t, t.TempDir())
		servicesAsOwnUsers(t, &bus.TLSFiles{CA: ca, Cert: cliCert, Key: cliKey}, srvCert, srvKey)
	})
}

func servicesAsOwnUsers(t *testing.T, tls *bus.TLSFiles, serverCert, serverKey string) {
	ns := runDeployServer(t, tls, serverCert, serverKey)
	var tlsFiles bus.TLSFiles
	if tls != nil {
		tlsFiles = *tls
	}
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// The admin creates the streams and buckets (qubesbus setup), as a deployment does
	// first; the services may not.
	socket := filepath.Join(dir, "qubesd.sock")
	log := slog.New(slog.NewTextHandler(testWriter{t}, nil))
	if err := system.Setup(ctx, system.Config{NATSURL: ns.ClientURL(), NATSUser: "admin", NATSPass: "pw-admin", NATSTLS: tlsFiles}, log); err != nil {
		t.Fatal(err)
	}
	for _, svc := range system.Services {
		cfg := system.Config{Socket: socket, DataDir: filepath.Join(dir, svc), QubesXML: "../../testdata/qubes.xml",
			HostID: "local", NATSURL: ns.ClientURL(), NATSUser: svc, NATSPass: "pw-" + svc, NATSTLS: tlsFiles}
		one, err := system.StartService(ctx, svc, cfg, log)
		if err != nil {
			t.Fatalf("%s as its own user: %v", svc, err)
		}
		defer one.Stop()
	}
	// In order: the Gets read what the Sets wrote.
	for _, c := range []struct{ req, want string }{
		{"admin.vm.property.Get+label dom0 name work\x00", "0\x00default=False type=label blue"},
		{"admin.vm.property.Set+memory dom0 name work\x00", "2\x00QubesValueError\x00\x00Failed to parse property value as int\x00"},
		{"admin.vm.feature.Set+perm dom0 name work\x00x", "0\x00"},
		{"admin.vm.feature.Get+perm dom0 name work\x00", "0\x00x"},
		{"admin.vm.notes.Set+ dom0 name work\x00hello", "0\x00"},
		{"admin.vm.notes.Get+ dom0 name work\x00", "0\x00hello"},
		// A simulated pool: its volumes in QUBES_SIMPOOLS, written, watched and read
		// back (a read waits for the bucket's last sequence).
		{"admin.pool.Add+lvm_thin dom0 name dom0\x00name=thin\nvolume_group=vg\nthin_pool=tp", "0\x00"},
		{"admin.vm.CreateInPool.AppVM+fedora-41 dom0 name dom0\x00name=thinq label=red pool=thin", "0\x00"},
		{"admin.vm.volume.Resize+private dom0 name thinq\x004294967296", "0\x00"},
		{"admin.vm.volume.Info+private dom0 name thinq\x00", "0\x00pool=thin\nvid=appvms/thinq/private\nsize=4294967296\nusage=0\nrw=True\nsource=\npath=/dev/sim/thin/appvms/thinq/private\nsave_on_stop=True\nsnap_on_start=False\nrevisions_to_keep=1\nephemeral=False\nis_outdated=False\n"},
		{"admin.pool.UsageDetails+thin dom0 name dom0\x00", "0\x00data_size=1099511627776\ndata_usage=15032385536\n"},
		{"admin.vm.Start+ dom0 name work\x00", "0\x00"},
		// Devices and the firewall, as the devices user (sys-firewall runs: its
		// QubesDB table is written).
		{"admin.vm.device.pci.Assign+dom0+00_14.3+0x8086+0x51f0++p028000 dom0 name personal\x00device_id='0x8086:0x51f0::p028000' port_id='00_14.3' devclass='pci' backend_domain='dom0' mode='required' frontend_domain='personal'", "0\x00"},
		{"admin.vm.device.pci.Unassign+dom0+00_14.3+0x8086+0x51f0++p028000 dom0 name personal\x00", "0\x00"},
		{"admin.vm.Start+ dom0 name sys-firewall\x00", "0\x00"},
		{"admin.vm.firewall.Set+ dom0 name work\x00action=accept dsthost=qubes-os.org\naction=drop\n", "0\x00"},
		{"admin.vm.firewall.Get+ dom0 name work\x00", "0\x00action=accept dsthost=qubes-os.org\naction=drop\n"},
		{"admin.vm.Create.AppVM+fedora-41 dom0 name dom0\x00name=gone label=red", "0\x00"},
		{"admin.vm.Remove+ dom0 name gone\x00", "0\x00"}, // holds the qube in vmlifecycle
		{"admin.vm.Remove+ dom0 name work\x00", "2\x00QubesVMNotHaltedError\x00\x00Domain is not powered off: 'work'\x00"},
	} {
		req, want := c.req, c.want
		resp, err := call(ctx, socket, strings.Split(req, "\x00")[0], []byte(strings.SplitN(req, "\x00", 2)[1]))
		if err != nil || string(resp) != want {
			t.Errorf("%q: %q %v, want %q", req, resp, err, want)
		}
	}
	// The gateway, as its own user, wrote the audit trail of the changes.
	expectAuditTrail(t, ctx, ns.ClientURL(), tlsFiles, []string{"admin.vm.property.Set", "admin.vm.feature.Set",
		"admin.vm.notes.Set", "admin.pool.Add", "admin.vm.CreateInPool.AppVM", "admin.vm.volume.Resize", "admin.vm.Start",
		"admin.vm.device.pci.Assign", "admin.vm.device.pci.Unassign", "admin.vm.Start", "admin.vm.firewall.Set",
		"admin.vm.Create.AppVM", "admin.vm.Remove", "admin.vm.Remove"})
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(b)))
	return len(b), nil
}

// TestPermissionsConfIsRendered: deploy/nats/permissions.conf is the access package's table as
// `qubesbus setup --print-permissions` renders it, so a server configured by hand gives
// every role the same rights as the embedded one. QUBESBUS_UPDATE_PERMISSIONS=1
// rewrites the file.
func TestPermissionsConfIsRendered(t *testing.T) {
	const path = "../../deploy/nats/permissions.conf"
	want := access.Conf("local") // docker-compose.yml's host
	if os.Getenv("QUBESBUS_UPDATE_PERMISSIONS") == "1" {
		if err := os.WriteFile(path, []byte(want), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != want {
		t.Fatalf("%s differs from the access package's roles; run QUBESBUS_UPDATE_PERMISSIONS=1 go test -run TestPermissionsConfIsRendered ./cmd/qubesbus/", path)
	}
}
