package configstore

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/qubesbus/qubesbus/bus/subject"
)

// syncedPatience is how long SyncedWatch.Sync waits for a notice before it asks
// (Client.Sync): notices are core NATS, so one lost across a reconnect costs a caller
// that long, not forever.
const syncedPatience = 100 * time.Millisecond

// SyncedWatch follows a host's durable-revision notices (subject.Host.ConfigSynced),
// which persistence publishes after each sync of the change log when it makes the log
// durable itself (Config.SyncLog). A caller that appended with DeferSync then learns
// its change is durable from the notice of the sync that covered it, without a
// store.sync round trip per change.
type SyncedWatch struct {
	client Client
	sub    *nats.Subscription
	heard  atomic.Bool   // a notice arrived: persistence publishes them
	synced atomic.Uint64 // highest revision announced durable

	mu    sync.Mutex
	moved chan struct{} // closed (and replaced) when synced moves
}

// WatchSynced subscribes to the notices of c's host until Close.
func WatchSynced(c Client) (*SyncedWatch, error) {
	w := &SyncedWatch{client: c, moved: make(chan struct{})}
	sub, err := c.NC.Subscribe(c.Host.ConfigSynced(), w.onNotice)
	if err != nil {
		return nil, fmt.Errorf("subscribe to durable-revision notices: %w", err)
	}
	w.sub = sub
	return w, nil
}

// PublishSynced announces that the change log holds revision rev durably.
func PublishSynced(nc *nats.Conn, host subject.Host, rev uint64) error {
	return nc.Publish(host.ConfigSynced(), strconv.AppendUint(nil, rev, 10))
}

func (w *SyncedWatch) onNotice(m *nats.Msg) {
	rev, err := strconv.ParseUint(string(m.Data), 10, 64)
	if err != nil {
		return
	}
	w.heard.Store(true)
	for cur := w.synced.Load(); rev > cur; cur = w.synced.Load() {
		if w.synced.CompareAndSwap(cur, rev) {
			w.mu.Lock()
			close(w.moved)
			w.moved = make(chan struct{})
			w.mu.Unlock()
			return
		}
	}
}

// Sync returns once revision rev is durable: on the notice that says so, or, until
// notices have been heard and whenever none says so within syncedPatience, on the
// answer of Client.Sync.
func (w *SyncedWatch) Sync(ctx context.Context, rev uint64) error {
	if !w.heard.Load() {
		return w.client.Sync(ctx, rev)
	}
	patience := time.NewTimer(syncedPatience)
	defer patience.Stop()
	for {
		w.mu.Lock()
		moved := w.moved
		w.mu.Unlock()
		if w.synced.Load() >= rev {
			return nil
		}
		select {
		case <-moved:
		case <-patience.C:
			return w.client.Sync(ctx, rev)
		case <-ctx.Done():
			return fmt.Errorf("sync change log: %w", ctx.Err())
		}
	}
}

// Close stops following the notices.
func (w *SyncedWatch) Close() error { return w.sub.Unsubscribe() }
