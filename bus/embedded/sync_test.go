package embedded

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// TestStreamSyncerFindsBlocks: the syncer finds the block that holds an acknowledged
// message where the file store keeps it, and syncs it (the layout it relies on).
func TestStreamSyncerFindsBlocks(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ns, err := Start(ctx, Config{StoreDir: t.TempDir(), DontListen: true})
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Shutdown()
	nc, err := nats.Connect("", nats.InProcessServer(ns))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "S", Subjects: []string{"s"}, Storage: jetstream.FileStorage}); err != nil {
		t.Fatal(err)
	}
	sy, err := NewStreamSyncer(ns, "", "S")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := js.Publish(ctx, "s", []byte("payload-to-find")); err != nil {
		t.Fatal(err)
	}
	if err := sy.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	blocks, _ := filepath.Glob(filepath.Join(sy.dir, "msgs", "*.blk"))
	if len(blocks) == 0 || len(sy.stamps) != len(blocks) {
		t.Fatalf("blocks %v, synced %v", blocks, sy.stamps)
	}
	b, err := os.ReadFile(blocks[len(blocks)-1])
	if err != nil || !bytes.Contains(b, []byte("payload-to-find")) {
		t.Fatalf("the acknowledged message is not in %s (%v)", blocks[len(blocks)-1], err)
	}
	if want := filepath.Base(blocks[len(blocks)-1]) + "/"; !strings.HasSuffix(sy.blocks, want) {
		t.Fatalf("message directory synced with blocks %q, want them to end with %q", sy.blocks, want)
	}
	// Nothing changed: a second Sync has no block to sync.
	before := sy.stamps
	if err := sy.Sync(ctx); err != nil || len(sy.stamps) != len(before) {
		t.Fatalf("second sync: %v", err)
	}
}
