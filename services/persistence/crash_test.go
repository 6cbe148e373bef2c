package persistence

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/qubesbus/qubesbus/schemas/configstore"

	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/schemas/config"
)

// ackedWrites records the writes clients saw acknowledged: feature name → domain id.
type ackedWrites struct {
	mu sync.Mutex
	m  map[string]string
}

func (a *ackedWrites) add(name, id string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.m[name] = id
}

func (a *ackedWrites) len() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.m)
}

// missing lists acknowledged writes that c lacks.
func (a *ackedWrites) missing(c *config.Config) []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []string
	for name, id := range a.m {
		if _, ok := feature(c, id, name); !ok {
			out = append(out, name)
		}
	}
	return out
}

// writeLoad runs writers that set a new feature each (ChangesConfig), recording the
// acknowledged ones, until ctx ends. onAck runs after each acknowledgement with the
// writer's number.
func writeLoad(ctx context.Context, t *testing.T, client configstore.Client, writers int, timeout time.Duration,
	next *atomic.Int64, acked *ackedWrites, onAck func(writer int)) *sync.WaitGroup {
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			for ctx.Err() == nil {
				n := next.Add(1)
				id := domainIDs[int(n)%len(domainIDs)]
				name := fmt.Sprintf("w%d", n)
				reqCtx, cancel := context.WithTimeout(ctx, timeout)
				_, err := client.Apply(reqCtx, setFeature(id, name, "v"))
				cancel()
				switch {
				case err == nil:
					acked.add(name, id)
					onAck(w)
				case ctx.Err() != nil:
					return
				case errors.Is(err, context.DeadlineExceeded), errors.Is(err, ErrUnavailable):
					// In flight to an instance that died: not acknowledged.
				default:
					t.Errorf("write %s: %v", name, err)
					return
				}
			}
		})
	}
	return &wg
}

// TestCrashRecovery kills a persistence process with SIGKILL at random points while
// writes are in flight, 20 times, and restarts it on the same data dir each time. Every
// acknowledged write must be in the restarted instance, and in qubes.xml once it
// serves (qubes.xml is written after the replies, so right after the kill it may lack
// the last ones; the restart replays them from the change log and writes it); qubes.xml
// must always parse and match its revision marker.
func TestCrashRecovery(t *testing.T) {
	if testing.Short() {
		t.Skip("starts 21 processes")
	}
	const rounds, maxAcks, writers = 20, 500, 8
	ns := bustest.RunJetStream(t)
	dir := t.TempDir()
	const host = "crash"
	client := configstore.Client{NC: bustest.Connect(t, ns), Host: subject.ForHost(host), Caller: configstore.Operator}
	seed := uint64(time.Now().UnixNano())
	rng := rand.New(rand.NewPCG(seed, 1))
	t.Logf("random seed %d", seed)
	acked := &ackedWrites{m: map[string]string{}}
	var next atomic.Int64
	start := time.Now()
	var kills []int
	for round := range rounds {
		c := startChild(t, ns.ClientURL(), dir, host, seedXML)
		// No deadline: the round ends at the kill, however long a slow machine takes
		// to get there (go test's -timeout bounds a hang).
		ctx, cancel := context.WithCancel(t.Context())
		snap, err := client.Snapshot(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if miss := acked.missing(snap.Config); len(miss) > 0 {
			t.Fatalf("round %d: restarted instance lacks %d acknowledged writes, e.g. %v", round, len(miss), miss[:1])
		}
		if conf, mark, err := loadCheckpoint(dir); err != nil {
			t.Fatalf("round %d: qubes.xml after the restart: %v", round, err)
		} else if miss := acked.missing(conf); len(miss) > 0 {
			t.Fatalf("round %d: qubes.xml (revision %d) after the restart lacks %d acknowledged writes, e.g. %v", round, mark.Revision, len(miss), miss[:1])
		}

		killAt := int64(1 + rng.IntN(maxAcks))
		var roundAcks atomic.Int64
		var once sync.Once
		wg := writeLoad(ctx, t, client, writers, 10*time.Second, &next, acked, func(int) {
			if roundAcks.Add(1) >= killAt {
				once.Do(func() {
					c.Kill() // the other writers are mid-call: a random point of apply
					cancel()
				})
			}
		})
		wg.Wait()
		cancel()
		if t.Failed() { // the writers gave up before the kill
			c.Kill()
			t.FailNow()
		}
		if err := c.Wait(t, time.Minute); !bustest.WasKilled(err) {
			t.Fatalf("round %d: instance ended with %v, not SIGKILL:\n%s", round, err, c.Log())
		}
		kills = append(kills, int(roundAcks.Load()))

		if _, _, err := loadCheckpoint(dir); err != nil {
			t.Fatalf("round %d: qubes.xml after SIGKILL: %v", round, err)
		}
		if t.Failed() {
			t.FailNow()
		}
	}

	// A last start replays whatever was durable but unsaved, and a SIGTERM saves it.
	c := startChild(t, ns.ClientURL(), dir, host, seedXML)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	snap, err := client.Snapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if miss := acked.missing(snap.Config); len(miss) > 0 {
		t.Fatalf("final instance lacks %d acknowledged writes", len(miss))
	}
	c.Stop(t, time.Minute)
	conf, mark, err := loadCheckpoint(dir)
	if err != nil {
		t.Fatal(err)
	}
	if mark.Revision != snap.Revision || len(acked.missing(conf)) > 0 {
		t.Fatalf("qubes.xml after SIGTERM at revision %d, instance was at %d", mark.Revision, snap.Revision)
	}
	t.Logf("%d SIGKILLs after %v acknowledged writes per round; %d acknowledged writes in all, %d attempted, all present; final revision %d; %s",
		rounds, kills, acked.len(), next.Load(), snap.Revision, time.Since(start).Round(time.Millisecond))
}
