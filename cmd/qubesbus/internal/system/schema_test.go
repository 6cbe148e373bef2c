package system

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/access"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus/cloudevent"
	"github.com/qubesbus/qubesbus/schemas/events"
	"github.com/qubesbus/qubesbus/services/backup/archive"
)

// TestEmittedEventsMatchSchemas drives every kind of change the services make, then
// reads the whole events stream back and checks each message: CloudEvents binary mode,
// the SDK can decode it, and its data matches the schema of its event.
func TestEmittedEventsMatchSchemas(t *testing.T) {
	profiles, out := t.TempDir(), t.TempDir()
	sys := startSystem(t, func(c *Config) {
		c.BackupProfiles = profiles
		c.BackupScrypt = archive.ScryptParams{LogN: 10, R: 8, P: 1}
	})
	profile := "destination_vm: dom0\ndestination_path: " + out + "\ninclude: [work]\npassphrase_text: x\n"
	if err := os.WriteFile(filepath.Join(profiles, "p.conf"), []byte(profile), 0o600); err != nil {
		t.Fatal(err)
	}
	calls := []string{
		"admin.backup.Execute+p dom0 name dom0\x00",
		"admin.vm.property.Set+memory dom0 name work\x00600",
		"admin.vm.property.Reset+memory dom0 name work\x00",
		"admin.vm.property.Set+label dom0 name work\x00green",
		"admin.property.Set+default_netvm dom0 name dom0\x00sys-net",
		"admin.property.Reset+default_netvm dom0 name dom0\x00",
		"admin.vm.feature.Set+foo.bar dom0 name work\x00x",
		"admin.vm.feature.Remove+foo.bar dom0 name work\x00",
		"admin.vm.tag.Set+t1 dom0 name work\x00",
		"admin.vm.tag.Remove+t1 dom0 name work\x00",
		"admin.vm.Create.AppVM+fedora-41 dom0 name dom0\x00name=schemavm label=red",
		"admin.vm.Start+ dom0 name work\x00",
		"admin.vm.Pause+ dom0 name work\x00",
		"admin.vm.Unpause+ dom0 name work\x00",
		"admin.vm.Shutdown+wait dom0 name work\x00",
		"admin.vm.Start+ dom0 name schemavm\x00",
		"admin.vm.Kill+ dom0 name schemavm\x00",
		"admin.vm.Remove+ dom0 name schemavm\x00",
	}
	for _, c := range calls {
		if got := roundTrip(t, sys.Socket, []byte(c)); len(got) < 2 || got[0] != '0' {
			t.Fatalf("%q: %q", c, got)
		}
	}

	nc := connectAs(t, sys, access.Admin)
	js, _ := jetstream.New(nc)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	s, err := js.Stream(ctx, cloudevent.StreamName)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]int{}
	for seq := info.State.FirstSeq; seq <= info.State.LastSeq; seq++ {
		raw, err := s.GetMsg(ctx, seq)
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		msg := &nats.Msg{Subject: raw.Subject, Header: raw.Header, Data: raw.Data}
		if msg.Header.Get("ce-specversion") != "1.0" || msg.Header.Get("ce-id") == "" || msg.Header.Get("ce-datacontenttype") != "application/json" {
			t.Errorf("seq %d: not a binary-mode CloudEvent: %v", seq, msg.Header)
		}
		ev, _, err := cloudevent.Decode(ctx, msg)
		if err != nil {
			t.Errorf("seq %d: SDK decode: %v", seq, err)
			continue
		}
		if err := events.ValidateEventData(ev.Name, raw.Data); err != nil {
			t.Errorf("seq %d %s: %v", seq, ev.Name, err)
		}
		names[ev.Name]++
	}
	total := 0
	for _, n := range names {
		total += n
	}
	t.Logf("%d events of %d kinds validated", total, len(names))
	for _, want := range []string{"backup-get-files", "property-set:backup_timestamp", "property-set:memory", "property-reset:memory", "domain-feature-set:foo.bar", "domain-tag-add:t1", "domain-add", "domain-delete", "domain-start", "domain-paused", "domain-shutdown", "domain-pre-delete"} {
		if names[want] == 0 {
			t.Errorf("no %s event was emitted", want)
		}
	}
}
