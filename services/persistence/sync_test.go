package persistence

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/schemas/configstore"
)

// TestAckAfterSync: with SyncLog set, every change is acknowledged only after a
// SyncLog call that began once the change was in the log, whoever asked for it; and
// changes appended with DeferSync share one SyncLog.
func TestAckAfterSync(t *testing.T) {
	ns := bustest.RunJetStream(t)
	var store *Store
	var covered atomic.Uint64 // highest revision a finished SyncLog call covers
	var calls atomic.Int64
	var gate atomic.Pointer[chan struct{}] // while set, SyncLog waits for it to close
	store = serve(t, ns, Config{DataDir: t.TempDir(), SeedXML: seedXML, SyncLog: func(context.Context) error {
		calls.Add(1)
		if store == nil { // the first base, during Serve
			return nil
		}
		if g := gate.Load(); g != nil {
			<-*g
		}
		rev := store.Revision() // appended and acknowledged by the log
		for c := covered.Load(); rev > c && !covered.CompareAndSwap(c, rev); c = covered.Load() {
		}
		return nil
	}})
	ctx := t.Context()
	client := configstore.Client{NC: bustest.Connect(t, ns), Host: testHost, Caller: configstore.Operator}

	var wg sync.WaitGroup
	for w := range 8 {
		wg.Go(func() {
			for i := range 25 {
				rev, err := client.Apply(ctx, setFeature(domainIDs[w], "f", string(rune('a'+i))))
				if err != nil {
					t.Error(err)
					return
				}
				if c := covered.Load(); rev > c {
					t.Errorf("revision %d acknowledged, synced only through %d", rev, c)
					return
				}
			}
		})
	}
	wg.Wait()
	m := store.Metrics()
	t.Logf("%d appends from 8 writers, %d syncs of the change log", m.Appends, m.Syncs)
	if m.Synced != m.Revision || m.Syncs == 0 || m.Syncs > m.Appends {
		t.Fatalf("metrics %+v", m)
	}

	// DeferSync: the apply answers before its sync ends (here the first one's sync is
	// held); the syncs of the changes appended meanwhile share the next one.
	before := store.Metrics().Syncs
	held := make(chan struct{})
	gate.Store(&held)
	var revs []uint64
	for _, id := range domainIDs {
		m := setFeature(id, "deferred", "1")
		m.DeferSync = true
		rev, err := client.Apply(ctx, m)
		if err != nil {
			t.Fatal(err)
		}
		revs = append(revs, rev)
	}
	if got := store.Metrics(); got.Syncs != before || got.Synced >= revs[0] {
		t.Fatalf("deferred applies synced: %+v", got)
	}
	for _, rev := range revs {
		wg.Go(func() {
			if err := client.Sync(ctx, rev); err != nil {
				t.Error(err)
			}
		})
	}
	gate.Store(nil)
	close(held)
	wg.Wait()
	if got := store.Metrics(); got.Syncs > before+2 || got.Synced != revs[len(revs)-1] || covered.Load() < revs[len(revs)-1] {
		t.Fatalf("%d syncs of %d deferred changes: %d SyncLog calls, synced %d (want at most 2, %d)", len(revs), len(revs), got.Syncs-before, got.Synced, revs[len(revs)-1])
	}
}
