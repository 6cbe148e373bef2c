package embedded

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
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
	js, _, sy := syncedStream(ctx, t, jetstream.StreamConfig{})
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

// Syncs between new blocks fsync the newest block alone; a new block, blocks removed by
// the stream's limits and a purge of every block each bring a full sync, after which
// the syncer holds the block the last message went to.
func TestStreamSyncerFollowsTheNewestBlock(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	// MaxBytes this small gives the smallest blocks (32 kB) and drops the oldest.
	js, stream, sy := syncedStream(ctx, t, jetstream.StreamConfig{MaxBytes: 100_000})
	defer sy.Close()
	// holdsNewest: the syncer's block is the newest on disk and has payload.
	holdsNewest := func(payload []byte) {
		t.Helper()
		blocks, _ := filepath.Glob(filepath.Join(sy.dir, "msgs", "*.blk"))
		var newest uint64
		for _, b := range blocks {
			idx, _ := strconv.ParseUint(strings.TrimSuffix(filepath.Base(b), ".blk"), 10, 64)
			newest = max(newest, idx)
		}
		if sy.last == nil || sy.lastIdx != newest {
			t.Fatalf("syncer holds block %d (open: %v), newest on disk is %d", sy.lastIdx, sy.last != nil, newest)
		}
		b, err := os.ReadFile(sy.last.Name())
		if err != nil || !bytes.Contains(b, payload) {
			t.Fatalf("the acknowledged message is not in %s (%v)", sy.last.Name(), err)
		}
	}
	publishAndSync := func(i int) []byte {
		t.Helper()
		payload := fmt.Appendf(bytes.Repeat([]byte{'x'}, 1000), "message-%05d", i)
		if _, err := js.Publish(ctx, "s", payload); err != nil {
			t.Fatal(err)
		}
		if err := sy.Sync(ctx); err != nil {
			t.Fatal(err)
		}
		return payload
	}
	const n = 300 // about ten blocks, most dropped again by MaxBytes
	for i := range n {
		holdsNewest(publishAndSync(i))
	}
	if sy.lastIdx < 5 {
		t.Fatalf("%d messages of 1 kB filled only %d blocks", n, sy.lastIdx)
	}
	if sy.fullRuns < int(sy.lastIdx) || sy.fullRuns > n/4 {
		t.Fatalf("%d full syncs of %d for %d blocks: want one per block, the rest on the newest", sy.fullRuns, n, sy.lastIdx)
	}
	if err := stream.Purge(ctx); err != nil {
		t.Fatal(err)
	}
	full := sy.fullRuns
	holdsNewest(publishAndSync(n))
	if sy.fullRuns != full+1 {
		t.Fatalf("the sync after a purge was not a full one")
	}
	// A compaction past the last message removes every block; the next one may
	// take any index, the first again.
	info, err := stream.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Purge(ctx, jetstream.WithPurgeSequence(info.State.LastSeq+1)); err != nil {
		t.Fatal(err)
	}
	holdsNewest(publishAndSync(n + 1))
	// After Close, syncs still sync (in full) but keep no descriptor.
	if err := sy.Close(); err != nil {
		t.Fatal(err)
	}
	publishAndSync(n + 2)
	if sy.last != nil {
		t.Fatal("a descriptor kept after Close")
	}
}

// syncedStream starts an embedded server for the test, creates the file stream S on
// subject s with cfg's limits, and returns it with its syncer.
func syncedStream(ctx context.Context, t *testing.T, cfg jetstream.StreamConfig) (jetstream.JetStream, jetstream.Stream, *StreamSyncer) {
	t.Helper()
	ns, err := Start(ctx, Config{StoreDir: t.TempDir(), DontListen: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ns.Shutdown)
	nc, err := nats.Connect("", nats.InProcessServer(ns))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, _ := jetstream.New(nc)
	cfg.Name, cfg.Subjects, cfg.Storage = "S", []string{"s"}, jetstream.FileStorage
	stream, err := js.CreateStream(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	sy, err := NewStreamSyncer(ns, "", "S")
	if err != nil {
		t.Fatal(err)
	}
	return js, stream, sy
}
