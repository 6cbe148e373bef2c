package system

import (
	"context"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/access"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/bus/cloudevent"
	"github.com/qubesbus/qubesbus/bus/rpc"
)

// losslessRounds is how often a subscriber opens admin.Events and a change follows its
// connection-established at once.
func losslessRounds() int {
	if testing.Short() {
		return 200
	}
	return 2000
}

// checkLossless opens admin.Events, waits for the marker, makes a change at once over
// another connection, and requires the change's event, every round.
func checkLossless(t *testing.T, socket string, rounds int, change func(i int) (wantFrame string)) {
	t.Helper()
	misses := 0
	for i := 0; i < rounds; i++ {
		s := openEvents(t, socket, "work")
		want := change(i)
		// The change's own pre-events may come first; its event must follow.
		var got []byte
		var err error
		for k := 0; k < 4 && string(got) != want; k++ {
			got, err = s.next(5 * time.Second)
			if err != nil {
				break
			}
		}
		if err != nil || string(got) != want {
			misses++
			t.Errorf("round %d: got %q %v, want %q", i, got, err, want)
		}
		s.c.Close()
		if misses > 5 {
			t.Fatalf("%d misses in %d rounds", misses, i+1)
		}
	}
	t.Logf("%d rounds, %d misses", rounds, misses)
}

// propertyChange sets work's memory over its own socket connection, alternating two
// values, and expects the property-set event.
func propertyChange(t *testing.T, socket string) func(int) string {
	return func(i int) string {
		// memory starts at its default, 400, which property-set reports as the oldvalue.
		newv, oldv := 400+i%2*100, 400+(i+1)%2*100
		if i == 0 {
			oldv = 400
		}
		resp := roundTrip(t, socket, []byte(fmt.Sprintf("admin.vm.property.Set+memory dom0 name work\x00%d", newv)))
		if string(resp) != "0\x00" {
			t.Fatalf("round %d: property.Set answered %q", i, resp)
		}
		return fmt.Sprintf("1\x00work\x00property-set:memory\x00name\x00memory\x00newvalue\x00%d\x00oldvalue\x00%d\x00\x00", newv, oldv)
	}
}

// eventChange makes the change by publishing the event a service would publish, from
// its own connection.
func eventChange(t *testing.T, nc jetstream.JetStream, host string) func(int) string {
	pub := cloudevent.NewPublisher(nc, host)
	return func(i int) string {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		v := fmt.Sprint(i)
		if err := pub.Publish(ctx, cloudevent.New("work", "domain-feature-set:round", "feature", "round", "value", v)); err != nil {
			t.Fatal(err)
		}
		return "1\x00work\x00domain-feature-set:round\x00feature\x00round\x00value\x00" + v + "\x00\x00"
	}
}

func TestLosslessEventsSingleServer(t *testing.T) {
	sys := startSystem(t)
	// Another subscriber stays connected throughout, so every round joins a running
	// event feed instead of starting one (both paths must lose nothing).
	bg := openEvents(t, sys.Socket, "dom0")
	go func() {
		for {
			if _, err := bg.next(time.Minute); err != nil {
				return
			}
		}
	}()
	js, err := jetstream.New(connectAs(t, sys, access.Admin))
	if err != nil {
		t.Fatal(err)
	}
	checkLossless(t, sys.Socket, losslessRounds(), eventChange(t, js, "test"))
}

// TestLosslessPropertySet is the test: open admin.Events, wait for
// connection-established, set a property at once over another connection, and the
// property-set event arrives, every round.
func TestLosslessPropertySet(t *testing.T) {
	sys := startSystem(t)
	checkLossless(t, sys.Socket, losslessRounds(), propertyChange(t, sys.Socket))
}

// TestLosslessEventsCluster runs the gateway and the changing side on different
// servers of a 3-node JetStream cluster, with the stream replicated 3 times.
func TestLosslessEventsCluster(t *testing.T) {
	servers := bustest.RunCluster(t, 3)
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cfg := Config{
		Socket: filepath.Join(dir, "qubesd.sock"), DataDir: filepath.Join(dir, "data"),
		QubesXML: filepath.Join(repoTestdata, "qubes.xml"), HostID: "test",
		NATSURL: servers[1].ClientURL(), Replicas: 3,
		ServiceNATSURLs: map[string]string{string(rpc.Gateway): servers[0].ClientURL(), string(rpc.Properties): servers[2].ClientURL()},
	}
	sys, err := Start(ctx, cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer sys.Stop()
	nc, err := bus.Connect(ctx, bus.ConnConfig{URL: servers[2].ClientURL(), Name: "changer"}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	info, err := js.Stream(ctx, cloudevent.StreamName)
	if err != nil {
		t.Fatal(err)
	}
	if r := info.CachedInfo().Config.Replicas; r != 3 {
		t.Fatalf("stream replicas %d, want 3", r)
	}
	if !strings.Contains(cfg.ServiceNATSURLs[string(rpc.Gateway)], "127.0.0.1") {
		t.Fatal("bad cluster URL")
	}
	checkLossless(t, sys.Socket, losslessRounds(), eventChange(t, js, "test"))
	// And through the services: gateway on n0, properties on n2, persistence on n1.
	checkLossless(t, sys.Socket, losslessRounds(), propertyChange(t, sys.Socket))
}
