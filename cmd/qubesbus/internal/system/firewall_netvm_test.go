package system

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/access"
	"github.com/qubesbus/qubesbus/services/devices"
)

// TestFirewallRepublishedWhenNetvmRestarts: on a whole host, a netvm that starts
// again gets the rules of its running clients in its table, also when they were
// lost meanwhile (qubesd writes them into the netvm's new QubesDB when it starts).
func TestFirewallRepublishedWhenNetvmRestarts(t *testing.T) {
	sys := startSystem(t)
	ctx := context.Background()
	js, err := jetstream.New(connectAs(t, sys, access.Devices))
	if err != nil {
		t.Fatal(err)
	}
	kv, err := js.KeyValue(ctx, devices.FirewallBucket)
	if err != nil {
		t.Fatal(err)
	}
	entry := func(e string) string { return devices.FirewallKey("test", "sys-firewall", "10.137.0.5", e) }
	want := map[string]string{"policy": "drop", "0000": "action=accept proto=tcp dstports=443-443", "0001": "action=drop", "": ""}
	published := func() error {
		for e, v := range want {
			got, err := kv.Get(ctx, entry(e))
			if err != nil {
				return fmt.Errorf("entry %q: %w", e, err)
			}
			if string(got.Value()) != v {
				return fmt.Errorf("entry %q = %q, want %q", e, got.Value(), v)
			}
		}
		return nil
	}
	ok := func(got string) {
		t.Helper()
		if got != "0\x00" {
			t.Fatalf("call failed: %q", got)
		}
	}
	ok(call(t, sys, "admin.vm.Start", "work", "", "")) // and sys-net, sys-firewall
	ok(call(t, sys, "admin.vm.firewall.Set", "work", "", "action=accept proto=tcp dstports=443\naction=drop\n"))
	bustest.CheckFor(t, 10*time.Second, 10*time.Millisecond, published)
	// sys-firewall dies and its table is lost; work keeps running.
	ok(call(t, sys, "admin.vm.Kill", "sys-firewall", "", ""))
	for e := range want {
		if err := kv.Purge(ctx, entry(e)); err != nil {
			t.Fatal(err)
		}
	}
	ok(call(t, sys, "admin.vm.Start", "sys-firewall", "", ""))
	bustest.CheckFor(t, 10*time.Second, 10*time.Millisecond, published)
}
