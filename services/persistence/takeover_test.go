package persistence

import (
	"context"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/qubesbus/qubesbus/schemas/configstore"

	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/schemas/qubesxml"
)

// TestTakeover: an instance in another process serves under write load while a second
// one, started on an empty data dir, stands by in this process (in the same queue
// group, following the log). The first is killed with SIGKILL; the second must carry
// the load within a few seconds and lose nothing that was acknowledged.
func TestTakeover(t *testing.T) {
	ns := bustest.RunJetStream(t)
	const host = "takeover"
	hostSubj := subject.ForHost(host)
	active := startChild(t, ns.ClientURL(), t.TempDir(), host, seedXML)
	standbyDir := t.TempDir()
	standby := serve(t, ns, Config{Host: hostSubj, DataDir: standbyDir})
	client := configstore.Client{NC: bustest.Connect(t, ns), Host: hostSubj, Caller: configstore.Operator}

	// No deadline: the load ends after afterKill acknowledgements, however long a
	// slow machine takes (go test's -timeout bounds a hang).
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	const writers, callTimeout = 8, 2 * time.Second
	const beforeKill, afterKill = 300, 300
	acked := &ackedWrites{m: map[string]string{}}
	var next atomic.Int64
	var (
		mu         sync.Mutex
		acks       int
		killedAt   time.Time
		after      int
		lastAck    [writers]time.Time
		longestGap time.Duration // the longest one writer waited across the kill
		allBack    time.Time     // when the last writer had an acknowledgement after the kill
		back       [writers]bool
	)
	wg := writeLoad(ctx, t, client, writers, callTimeout, &next, acked, func(w int) {
		mu.Lock()
		defer mu.Unlock()
		now := time.Now()
		acks++
		if !killedAt.IsZero() {
			if !back[w] {
				back[w] = true
				longestGap = max(longestGap, now.Sub(lastAck[w]))
				allBack = now
			}
			if after++; after == afterKill {
				cancel()
			}
		}
		lastAck[w] = now
		if acks == beforeKill {
			killedAt = time.Now()
			active.Kill()
		}
	})
	wg.Wait()
	if err := active.Wait(t, time.Minute); !bustest.WasKilled(err) {
		t.Fatalf("active instance ended with %v", err)
	}
	if after < afterKill {
		t.Fatalf("only %d writes acknowledged after the kill", after)
	}
	// A writer whose call was in flight to the killed instance waits out its call
	// timeout; every other call goes to the standby at once.
	takeover := allBack.Sub(killedAt)
	t.Logf("takeover: every writer acknowledged again %v after SIGKILL (longest wait of one writer %v, call timeout %v); %d writes acknowledged before, %d after; standby appended %d",
		takeover.Round(time.Millisecond), longestGap.Round(time.Millisecond), callTimeout, beforeKill, after, standby.Metrics().Appends)
	if takeover > 5*time.Second {
		t.Fatalf("standby took %v to serve every writer", takeover)
	}
	if miss := acked.missing(standby.Snapshot().Config); len(miss) > 0 {
		t.Fatalf("standby lacks %d acknowledged writes, e.g. %v", len(miss), miss[0])
	}
	// Its own qubes.xml, built from the log, holds them too once it saves.
	if err := standby.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	onDisk, err := qubesxml.Load(filepath.Join(standbyDir, "qubes.xml"))
	if err != nil {
		t.Fatal(err)
	}
	if miss := acked.missing(onDisk); len(miss) > 0 {
		t.Fatalf("standby's qubes.xml lacks %d acknowledged writes", len(miss))
	}
}
