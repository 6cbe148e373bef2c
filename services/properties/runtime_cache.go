package properties

import (
	"context"
	"sync"
	"time"

	"github.com/qubesbus/qubesbus/bus/envelope"
	"github.com/qubesbus/qubesbus/schemas/model"
)

// runtimeSource supplies the snapshots a runtimeCache keeps (Lifecycle).
type runtimeSource interface {
	RuntimeSnapshot(ctx context.Context) (model.RuntimeSnapshot, error)
}

// runtimeCache keeps the lifecycle's last settled runtime snapshot, which saves GetAll
// and List a NATS round trip each. A snapshot is served only while it is provably
// current:
//   - no change notice newer than its mark has arrived (the lifecycle publishes one
//     when an operation begins and when it ends, and on every hypervisor notice);
//   - the caller has not seen a newer mark (the gateway sends the newest mark any
//     reply carried, so a GetAll after a Start's reply never reads the state from
//     before the Start, even if the notice is still on its way);
//   - it was derived from the configuration revision being read;
//   - it is younger than maxAge, which bounds staleness should a notice be lost
//     (core NATS does not redeliver across a reconnect).
type runtimeCache struct {
	src    runtimeSource
	maxAge time.Duration
	now    func() time.Time

	mu    sync.Mutex
	snap  model.RuntimeSnapshot
	has   bool
	taken time.Time
	heard envelope.RuntimeMark // newest change notice
}

func newRuntimeCache(src runtimeSource, maxAge time.Duration) *runtimeCache {
	return &runtimeCache{src: src, maxAge: maxAge, now: time.Now}
}

// get returns the runtime values current for a caller that has seen mark want, over
// configuration revision rev.
func (c *runtimeCache) get(ctx context.Context, want envelope.RuntimeMark, rev uint64) (map[string]model.Runtime, error) {
	c.mu.Lock()
	if c.has && !c.snap.Mark.Less(want) && !c.snap.Mark.Less(c.heard) && c.snap.ConfigRev == rev &&
		c.now().Sub(c.taken) < c.maxAge {
		vals := c.snap.Values
		c.mu.Unlock()
		return vals, nil
	}
	c.mu.Unlock()
	taken := c.now()
	snap, err := c.src.RuntimeSnapshot(ctx)
	if err != nil {
		return nil, err
	}
	if snap.Settled {
		c.mu.Lock()
		if !c.has || !snap.Mark.Less(c.snap.Mark) {
			c.snap, c.has, c.taken = snap, true, taken
		}
		c.mu.Unlock()
	}
	return snap.Values, nil
}

// heardOf records a change notice.
func (c *runtimeCache) heardOf(m envelope.RuntimeMark) {
	c.mu.Lock()
	c.heard = c.heard.Max(m)
	c.mu.Unlock()
}
