package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/audit"
	"github.com/qubesbus/qubesbus/bus/cloudevent"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/access"
)

// expectViolation waits for the permissions violation the server reports on errs.
func expectViolation(t *testing.T, errs <-chan error, what string) {
	t.Helper()
	select {
	case err := <-errs:
		if !errors.Is(err, nats.ErrPermissionViolation) && !strings.Contains(err.Error(), "Permissions Violation") {
			t.Fatalf("%s: %v is not a permissions violation", what, err)
		}
	case <-time.After(time.Minute):
		t.Fatalf("%s: no permissions violation reported", what)
	}
}

// TestOnlyTheGatewayUserWritesTheAuditTrail: with deploy/nats's users, the gateway
// stores an audit record; every other user (each service's, storage, devices and
// backup included, the readers', the web view's, the lab's) is refused on the audit
// subject, and nothing it sent is stored.
func TestOnlyTheGatewayUserWritesTheAuditTrail(t *testing.T) {
	ns := runDeployServer(t, nil, "", "")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	ajs, _ := jetstream.New(connectAs(t, ns, "admin", make(chan error, 16)))
	if _, err := audit.EnsureStream(ctx, ajs, audit.StreamConfig{}); err != nil {
		t.Fatal(err)
	}
	data, _ := json.Marshal(audit.Record{Source: "dom0", Method: "admin.vm.Start", Dest: "work", Outcome: audit.OutcomeOK})
	for _, r := range access.Roles {
		user := r.Name
		if user == access.Admin {
			continue
		}
		t.Run(user, func(t *testing.T) {
			errs := make(chan error, 16)
			js, _ := jetstream.New(connectAs(t, ns, user, errs))
			pctx, pcancel := context.WithTimeout(ctx, 2*time.Second)
			defer pcancel()
			_, err := js.Publish(pctx, subject.ForHost("local").Audit(), data)
			if user == "gateway" {
				if err != nil {
					t.Fatalf("the gateway's record refused: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("%s stored an audit record", user)
			}
			expectViolation(t, errs, user+" publishing on the audit subject")
		})
	}
	s, err := ajs.Stream(ctx, audit.StreamName)
	if err != nil {
		t.Fatal(err)
	}
	if n := s.CachedInfo().State.Msgs; n != 1 {
		t.Fatalf("QUBES_AUDIT holds %d records, want the gateway's one", n)
	}
}

// TestReadersReadOnlyTheirStream: the events user tails QUBES_EVENTS and cannot open a
// consumer on QUBES_AUDIT; the auditor user the other way round.
func TestReadersReadOnlyTheirStream(t *testing.T) {
	ns := runDeployServer(t, nil, "", "")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	admin := connectAs(t, ns, "admin", make(chan error, 16))
	ajs, _ := jetstream.New(admin)
	if _, err := cloudevent.EnsureStream(ctx, ajs, cloudevent.StreamConfig{}); err != nil {
		t.Fatal(err)
	}
	if _, err := audit.EnsureStream(ctx, ajs, audit.StreamConfig{}); err != nil {
		t.Fatal(err)
	}
	if err := cloudevent.NewPublisher(ajs, "local").Publish(ctx, cloudevent.New("work", "domain-start", "start_guid", "True")); err != nil {
		t.Fatal(err)
	}
	data, _ := json.Marshal(audit.Record{Host: "local", Source: "dom0", Method: "admin.vm.Start", Dest: "work", Outcome: audit.OutcomeOK, RequestID: "r1"})
	if _, err := ajs.Publish(ctx, subject.ForHost("local").Audit(), data); err != nil {
		t.Fatal(err)
	}
	quiet := slog.New(slog.DiscardHandler)

	// Each reader tails its own stream with the command's code.
	t.Setenv("QUBESBUS_NATS_PASSWORD", "pw-events")
	var out bytes.Buffer
	if err := tailEvents(ctx, tailOptions{streamClient: streamClient{NATSURL: ns.ClientURL(), User: "events"}, Host: "local", Since: "1", Limit: 1, JSON: true}, &out, quiet); err != nil ||
		!strings.Contains(out.String(), `"event":"domain-start"`) {
		t.Fatalf("events user tailing QUBES_EVENTS: %v %q", err, out.String())
	}
	t.Setenv("QUBESBUS_NATS_PASSWORD", "pw-auditor")
	out.Reset()
	if err := tailAudit(ctx, auditOptions{streamClient: streamClient{NATSURL: ns.ClientURL(), User: "auditor"}, Host: "local", Since: "1", Limit: 1}, &out, quiet); err != nil ||
		!strings.Contains(out.String(), "dom0 → admin.vm.Start work - ok id=r1\n") {
		t.Fatalf("auditor tailing QUBES_AUDIT: %v %q", err, out.String())
	}

	// Neither reads the other's stream.
	for _, c := range []struct{ user, stream string }{{"events", audit.StreamName}, {"auditor", cloudevent.StreamName}} {
		errs := make(chan error, 16)
		js, _ := jetstream.New(connectAs(t, ns, c.user, errs))
		cctx, ccancel := context.WithTimeout(ctx, 2*time.Second)
		_, err := js.OrderedConsumer(cctx, c.stream, jetstream.OrderedConsumerConfig{})
		ccancel()
		if err == nil {
			t.Fatalf("%s opened a consumer on %s", c.user, c.stream)
		}
		expectViolation(t, errs, c.user+" reading "+c.stream)
	}
}

// expectAuditTrail reads QUBES_AUDIT as the auditor user (deploy/nats) and checks it
// holds one record per method in want, in order, all from the gateway's calls.
func expectAuditTrail(t *testing.T, ctx context.Context, url string, tls bus.TLSFiles, want []string) {
	t.Helper()
	t.Setenv("QUBESBUS_NATS_PASSWORD", "pw-auditor")
	var out bytes.Buffer
	o := auditOptions{streamClient: streamClient{NATSURL: url, User: "auditor", TLS: tls}, Host: "local", Since: "1", Limit: len(want), JSON: true}
	tctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := tailAudit(tctx, o, &out, slog.New(slog.DiscardHandler)); err != nil {
		t.Fatalf("audit trail: %v (read %q)", err, out.String())
	}
	var got []string
	for _, line := range strings.Split(strings.TrimSpace(out.String()), "\n") {
		var r audit.Record
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			t.Fatal(err)
		}
		got = append(got, r.Method)
	}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("audit trail %v, want %v", got, want)
	}
}
