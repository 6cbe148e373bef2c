package main

import (
	"context"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus/cloudevent"
	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/access"
	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/system"
)

// `qubesbus events` prints the exact names of an event whose names are too long for
// its subject (hashed tokens) or its headers (structured mode), and filters by them.
func TestEventsTailLongNames(t *testing.T) {
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	sys, err := system.Start(ctx, system.Config{
		Socket: filepath.Join(dir, "s.sock"), DataDir: filepath.Join(dir, "data"),
		QubesXML: "../../testdata/qubes.xml", HostID: "lab1", NATSPort: -1,
	}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer sys.Stop()
	nc, err := sys.ConnectAs(ctx, access.Admin, t.Name())
	if err != nil {
		t.Fatal(err)
	}
	js, _ := jetstream.New(nc)
	pub := cloudevent.NewPublisher(js, "lab1")
	vm := strings.Repeat("v", 200)
	tag := strings.Repeat("t", 20000)
	evs := []cloudevent.Event{
		cloudevent.New("work", "domain-tag-add:"+tag, "tag", tag),
		cloudevent.New(vm, "domain-feature-set:a\r\nb", "feature", "a\r\nb", "value", "1"),
		cloudevent.New("work", "domain-tag-add:short", "tag", "short"),
	}
	if err := pub.Publish(ctx, evs...); err != nil {
		t.Fatal(err)
	}
	base := tailOptions{streamClient: streamClient{NATSURL: sys.NATSURL, DataDir: filepath.Join(dir, "data")}, Host: "lab1", Since: "1"}
	all := base
	all.Limit = 3
	got := tail(t, all)
	for i, e := range got {
		if e.Host != "lab1" || e.VM != evs[i].VM || e.Event != evs[i].Name {
			t.Fatalf("event %d: host %q vm %q event %q", i, e.Host, cloudevent.LogName(e.VM), cloudevent.LogName(e.Event))
		}
	}
	for _, host := range []string{"lab1", "*"} {
		one := base
		one.Host, one.VM, one.Limit = host, vm, 1
		if got := tail(t, one); len(got) != 1 || got[0].VM != vm || got[0].Kwargs["feature"] != "a\r\nb" || got[0].Host != "lab1" {
			t.Fatalf("--host %s --vm <long>: %+v", host, got)
		}
	}
}
