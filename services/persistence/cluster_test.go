package persistence

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/qubesbus/qubesbus/schemas/configstore"
	"github.com/qubesbus/qubesbus/schemas/replica"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/schemas/changelog"
)

// TestClusterLeaderLoss: with the log replicated 3 times, losing the server that leads
// the stream costs a pause (calls fail with ErrUnavailable while a new leader is
// elected), never an acknowledged change; two instances and a replica end equal.
func TestClusterLeaderLoss(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a 3-node cluster")
	}
	servers := bustest.RunCluster(t, 3)
	var urls []string
	for _, s := range servers {
		urls = append(urls, s.ClientURL())
	}
	connect := func(name string) *nats.Conn {
		nc, err := bus.Connect(context.Background(), bus.ConnConfig{URL: strings.Join(urls, ","), Name: name}, quiet)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(nc.Close)
		return nc
	}
	ctx := t.Context()
	var stores []*Store
	for i := range 2 {
		dir := t.TempDir()
		var s *Store
		bustest.CheckFor(t, 30*time.Second, 200*time.Millisecond, func() error {
			var err error
			if s, err = New(Config{Host: testHost, DataDir: dir, SeedXML: seedXML, Replicas: 3, Log: slog.New(slog.DiscardHandler)}); err != nil {
				return err
			}
			_, err = s.Serve(ctx, connect(fmt.Sprint("persistence-", i)))
			return err
		})
		t.Cleanup(func() { _ = s.Close(context.Background()) })
		stores = append(stores, s)
	}
	rep, err := replica.Follow(ctx, connect("replica"), testHost, quiet)
	if err != nil {
		t.Fatal(err)
	}
	js, err := jetstream.New(connect("probe"))
	if err != nil {
		t.Fatal(err)
	}
	st, err := js.Stream(ctx, changelog.StreamName)
	if err != nil {
		t.Fatal(err)
	}
	info, err := st.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}

	client := configstore.Client{NC: connect("client"), Host: testHost, Caller: configstore.Operator}
	var last uint64
	var pause time.Duration
	for i := range 60 {
		if i == 20 {
			for _, s := range servers {
				if s.Name() == info.Cluster.Leader {
					s.Shutdown()
				}
			}
		}
		start := time.Now()
		bustest.CheckFor(t, 30*time.Second, 50*time.Millisecond, func() error {
			cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			defer cancel()
			rev, err := client.Apply(cctx, setMemory("domain-5", fmt.Sprint(i), i%10 == 0))
			if err != nil && !errors.Is(err, ErrUnavailable) && !errors.Is(err, context.DeadlineExceeded) &&
				!errors.Is(err, nats.ErrNoResponders) {
				t.Fatalf("write %d: %v", i, err)
			}
			last = max(last, rev)
			return err
		})
		pause = max(pause, time.Since(start))
	}
	t.Logf("stream leader %s shut down after 20 writes; longest write %v", info.Cluster.Leader, pause.Round(time.Millisecond))
	bustest.CheckFor(t, 30*time.Second, 50*time.Millisecond, func() error {
		a, b := stores[0].Revision(), stores[1].Revision()
		if a < last || b < last || rep.Revision() < last {
			return fmt.Errorf("instances at %d and %d, replica at %d, last write %d", a, b, rep.Revision(), last)
		}
		return nil
	})
	for i, s := range stores {
		if got := property(s.Snapshot().Config, "domain-5", "memory"); got != "59" {
			t.Fatalf("instance %d: memory %q", i, got)
		}
	}
}
