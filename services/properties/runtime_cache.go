package properties

import (
	"context"
	"sync"
	"time"

	"github.com/qubesbus/qubesbus/bus/envelope"
	"github.com/qubesbus/qubesbus/schemas/config"
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
//   - it was derived from the configuration revision being read, or from the one
//     before a change of this service that cannot move a power state (advance);
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
	// gen numbers the snapshots kept, so a reply computed from one can be kept with it
	// (replyCache); one taken again at the same mark and revision keeps the number.
	gen uint64
}

func newRuntimeCache(src runtimeSource, maxAge time.Duration) *runtimeCache {
	return &runtimeCache{src: src, maxAge: maxAge, now: time.Now}
}

// get returns the runtime values current for a caller that has seen mark want, over
// configuration revision rev, and the number of the kept snapshot they are (0: values
// fetched but not kept). Values of one number never change.
func (c *runtimeCache) get(ctx context.Context, want envelope.RuntimeMark, rev uint64) (map[string]model.Runtime, uint64, error) {
	c.mu.Lock()
	if c.has && !c.snap.Mark.Less(want) && !c.snap.Mark.Less(c.heard) && c.snap.ConfigRev == rev &&
		c.now().Sub(c.taken) < c.maxAge {
		vals, gen := c.snap.Values, c.gen
		c.mu.Unlock()
		return vals, gen, nil
	}
	c.mu.Unlock()
	taken := c.now()
	snap, err := c.src.RuntimeSnapshot(ctx)
	if err != nil {
		return nil, 0, err
	}
	var gen uint64
	if snap.Settled {
		c.mu.Lock()
		if !c.has || !snap.Mark.Less(c.snap.Mark) {
			// A settled snapshot at the same mark and revision holds the same values:
			// it keeps its number, so replies computed from it stay (replyCache).
			if !c.has || snap.Mark != c.snap.Mark || snap.ConfigRev != c.snap.ConfigRev {
				c.gen++
			}
			c.snap, c.has, c.taken, gen = snap, true, taken, c.gen
		}
		c.mu.Unlock()
	}
	return snap.Values, gen, nil
}

// current reports whether get would still answer snapshot gen over revision rev: no
// notice since and not too old (the caller's own mark was met when it got gen).
func (c *runtimeCache) current(rev, gen uint64) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.has && c.gen == gen && c.snap.ConfigRev == rev && !c.snap.Mark.Less(c.heard) &&
		c.now().Sub(c.taken) < c.maxAge
}

// heardOf records a change notice.
func (c *runtimeCache) heardOf(m envelope.RuntimeMark) {
	c.mu.Lock()
	c.heard = c.heard.Max(m)
	c.mu.Unlock()
}

// advance carries a snapshot derived from revision rev-1 over to rev when the change
// that made rev (ops, this service's own) leaves every power state as it was, so a
// stream of such changes (feature.Set, property.Set) does not cost a fresh snapshot
// each: a NATS round trip, and on the lifecycle's side a scan of every qube.
func (c *runtimeCache) advance(rev uint64, ops []config.Op) {
	if !runtimeNeutral(ops) {
		return
	}
	c.mu.Lock()
	if c.has && c.snap.ConfigRev == rev-1 {
		c.snap.ConfigRev = rev
	}
	c.mu.Unlock()
}

// runtimeNeutral reports whether ops leave the runtime snapshot as it was. The
// lifecycle derives it from the configuration through which qubes exist, their class
// (RemoteVMs are always running) and the qrexec feature, their own or their
// template's (vmlifecycle.Service.Runtimes); an op that might touch any of that, or an
// op kind not listed, is not neutral.
func runtimeNeutral(ops []config.Op) bool {
	for _, op := range ops {
		switch op.Kind {
		case config.OpSetFeature, config.OpDelFeature:
			if op.Name == "qrexec" {
				return false
			}
		case config.OpSetProperty, config.OpDelProperty:
			if op.Name == "template" {
				return false
			}
		case config.OpSetGlobalProperty, config.OpDelGlobalProperty:
			if op.Name == "default_template" {
				return false
			}
		case config.OpAddTag, config.OpDelTag, config.OpSetDevices, config.OpSetFirewall:
		default:
			return false
		}
	}
	return true
}
