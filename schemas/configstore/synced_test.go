package configstore

import (
	"encoding/json"
	"sync/atomic"
	"testing"

	"github.com/nats-io/nats.go"

	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/bus/subject"
)

// SyncedWatch asks store.sync until persistence's notices are heard, then takes the
// notices' word, and asks again when none covers a revision in time (a lost notice).
func TestSyncedWatch(t *testing.T) {
	ns := bustest.RunJetStream(t)
	host := subject.ForHost("h1")
	store := bustest.Connect(t, ns)
	var asked atomic.Int64
	if _, err := store.Subscribe(host.Store(OpSync), func(m *nats.Msg) {
		asked.Add(1)
		var req SyncRequest
		_ = json.Unmarshal(m.Data, &req)
		b, _ := json.Marshal(ApplyReply{Revision: req.Revision})
		_ = m.Respond(b)
	}); err != nil {
		t.Fatal(err)
	}
	if err := store.Flush(); err != nil {
		t.Fatal(err)
	}
	w, err := WatchSynced(Client{NC: bustest.Connect(t, ns), Host: host})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	ctx := t.Context()
	expect := func(step string, rev uint64, want int64) {
		t.Helper()
		if err := w.Sync(ctx, rev); err != nil {
			t.Fatalf("%s: %v", step, err)
		}
		if n := asked.Load(); n != want {
			t.Fatalf("%s: store.sync asked %d times, want %d", step, n, want)
		}
	}
	expect("no notice heard yet: ask", 3, 1)

	notice := func(rev uint64) {
		t.Helper()
		w.mu.Lock()
		moved := w.moved
		w.mu.Unlock()
		if err := PublishSynced(store, host, rev); err != nil {
			t.Fatal(err)
		}
		<-moved
	}
	notice(5)
	expect("covered by a notice", 5, 1)

	done := make(chan error, 1)
	go func() { done <- w.Sync(ctx, 7) }()
	notice(7)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if n := asked.Load(); n != 1 {
		t.Fatalf("a waiter the notice covered asked store.sync (%d)", n)
	}
	expect("no notice covers it: ask after a while", 9, 2)
}
