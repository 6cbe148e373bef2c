package storage

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/qerr"
	storageapi "github.com/qubesbus/qubesbus/schemas/storage"
)

// simDriver keeps volumes as metadata only (sizes, revisions) in the host's
// QUBES_SIMPOOLS bucket (simstore.go), for labs of thousands of qubes. It also answers the lvm_thin and zfs driver names, whose pools need
// hardware this host does not have.
type simDriver struct {
	name   string
	params []Param
}

// SimCapacity is the size a simulated pool reports.
const SimCapacity = int64(1) << 40

func (d simDriver) Name() string    { return d.name }
func (d simDriver) Params() []Param { return d.params }

func (d simDriver) Open(cfg PoolConfig, host Host) (Pool, error) {
	if host.sim == nil {
		return nil, fmt.Errorf("%w: %s pools need the simulated volumes' store", ErrBadOption, d.name)
	}
	p := &simPool{driver: d.name, host: host, store: host.sim, rtk: "1"}
	p.name, _ = cfg.Get("name")
	p.cfg = PoolConfig{{"name", p.name}, {"driver", d.name}}
	for _, prm := range d.params {
		if v, ok := cfg.Get(prm.Name); ok {
			p.cfg = append(p.cfg, KV{prm.Name, v})
			if prm.Name == "revisions_to_keep" {
				p.rtk = v
			}
		}
	}
	return p, nil
}

type simPool struct {
	driver, name, rtk string
	cfg               PoolConfig
	host              Host
	faults            *simFaults // set by the service; nil: none
	// store keeps the volumes, shared by every instance of the host: a pool reopened
	// with other options (or by another instance) has the same volumes.
	store *simStore
}

// simFaults are the faults a lab injects into one simulated pool
// (storageapi.LabOpFaults); the service keeps them by pool name, so they outlive a
// reopening of the pool.
type simFaults struct {
	mu   sync.Mutex
	spec storageapi.LabFaultSpec
}

func (f *simFaults) get() storageapi.LabFaultSpec {
	if f == nil {
		return storageapi.LabFaultSpec{}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.spec
}

func (f *simFaults) set(spec storageapi.LabFaultSpec) {
	f.mu.Lock()
	f.spec = spec
	f.mu.Unlock()
}

// full is the error of a write to a full pool: lvm's, as qubesd passes it on
// (StoragePoolException of lvm's stderr).
func (p *simPool) full() error {
	where := p.name
	if vg, ok := p.cfg.Get("volume_group"); ok {
		tp, _ := p.cfg.Get("thin_pool")
		where = vg + "/" + tp
	}
	return qerr.StoragePoolException("  Cannot create new thin volume, free space in thin pool " + where + " reached threshold.")
}

// copyDelay waits as long as a slow clone takes, or until ctx ends.
func (p *simPool) copyDelay(ctx context.Context) error {
	d := time.Duration(p.faults.get().CloneDelayMS) * time.Millisecond
	if d <= 0 {
		return nil
	}
	return bus.Sleep(ctx, d)
}

var _ Pool = (*simPool)(nil)

func (p *simPool) Config() PoolConfig          { return slices.Clone(p.cfg) }
func (p *simPool) Setup(context.Context) error { return nil }
func (p *simPool) DirPath() string             { return "" }
func (p *simPool) Listed() []string            { return nil }

// Destroy forgets the volumes of a removed pool, so that a pool added again under
// its name starts empty.
func (p *simPool) Destroy(ctx context.Context) error {
	var vids []string
	p.store.each(p.name, func(vid string, _ *simRecord) { vids = append(vids, vid) })
	var errs []error
	for _, vid := range vids {
		errs = append(errs, p.store.change(ctx, p.name, vid, func(*simRecord) (*simRecord, error) { return nil, nil }))
	}
	return errors.Join(errs...)
}

func (p *simPool) Usage() (int64, int64, bool) {
	var used int64
	p.store.each(p.name, func(_ string, r *simRecord) { used += r.Size })
	return SimCapacity, min(used, SimCapacity), true
}

func (p *simPool) now() time.Time {
	if p.host.Stamp != nil {
		return *p.host.Stamp
	}
	return time.Now()
}

// orNew is a volume's record, made from its settings when it has none yet (a
// fixture's qube).
func orNew(r *simRecord, v Volume) *simRecord {
	if r == nil {
		return &simRecord{Size: v.Size, Next: 1}
	}
	return r
}

// change applies f to the volume's record (made from its settings if need be).
func (p *simPool) change(ctx context.Context, v Volume, f func(r *simRecord) error) error {
	return p.store.change(ctx, p.name, v.VID, func(cur *simRecord) (*simRecord, error) {
		r := orNew(cur, v)
		return r, f(r)
	})
}

func (p *simPool) Create(ctx context.Context, v Volume) error {
	if v.SaveOnStop && !v.SnapOnStart && p.faults.get().Full {
		return p.full()
	}
	return p.store.change(ctx, p.name, v.VID, func(*simRecord) (*simRecord, error) {
		return &simRecord{Size: v.Size, Next: 1}, nil
	})
}

func (p *simPool) Remove(ctx context.Context, v Volume) error {
	return p.store.change(ctx, p.name, v.VID, func(*simRecord) (*simRecord, error) { return nil, nil })
}

func (p *simPool) Size(v Volume) int64 {
	if r, _ := p.store.get(p.name, v.VID); r != nil {
		return r.Size
	}
	return v.Size
}

func (p *simPool) UsageOf(Volume) int64 { return 0 }
func (p *simPool) Path(v Volume) string { return "/dev/sim/" + p.name + "/" + v.VID }

func (p *simPool) Revisions(v Volume) ([]Revision, error) {
	if r, _ := p.store.get(p.name, v.VID); r != nil {
		return r.Revs, nil
	}
	return nil, nil
}

func (p *simPool) IsOutdated(Volume, *Source) bool { return false }

// Resize: lvm.py ThinVolume.resize refuses a read-only volume with its text, zfs.py
// checks nothing; both resize a running volume (its snapshot) in place.
func (p *simPool) Resize(ctx context.Context, v Volume, size int64) error {
	if !v.RW {
		switch p.driver {
		case "lvm_thin":
			return qerr.StoragePoolException("Can not resize readonly volume " + v.VID)
		case "callback":
			return fmt.Errorf("%w: resize of %s", ErrReadOnly, v.VID)
		}
	}
	f := p.faults.get()
	if f.ResizeFails != "" {
		return qerr.StoragePoolException(f.ResizeFails)
	}
	return p.change(ctx, v, func(r *simRecord) error {
		if f.Full && size > r.Size {
			return p.full()
		}
		r.Size = size
		return nil
	})
}

// commit keeps the current data as a revision and drops those beyond the limit.
func (p *simPool) commit(v Volume, r *simRecord) {
	if v.RevisionsToKeep != 0 {
		r.Revs = append(r.Revs, Revision{ID: strconv.Itoa(r.Next), Time: p.now()})
		r.Next++
	}
	if keep := v.RevisionsToKeep; keep <= 0 {
		if keep == 0 {
			r.Revs = nil
		} else {
			r.Revs = r.Revs[min(-keep, len(r.Revs)):]
		}
	} else if len(r.Revs) > keep {
		r.Revs = slices.Clone(r.Revs[len(r.Revs)-keep:])
	}
	if len(r.Revs) == 0 {
		r.Revs = nil
	}
}

func (p *simPool) Revert(ctx context.Context, v Volume, revision string) error {
	return p.change(ctx, v, func(r *simRecord) error {
		i := slices.IndexFunc(r.Revs, func(rv Revision) bool { return rv.ID == revision })
		if i < 0 {
			return fmt.Errorf("%w: %s", ErrNoRevision, revision)
		}
		r.Revs = slices.Delete(r.Revs, i, i+1)
		if v.RevisionsToKeep != 0 {
			r.Revs = append(r.Revs, Revision{ID: strconv.Itoa(r.Next), Time: p.now()})
			r.Next++
		}
		return nil
	})
}

func (p *simPool) Import(ctx context.Context, v Volume, src *Source) error {
	if !v.SaveOnStop {
		return nil
	}
	if p.faults.get().Full {
		return p.full()
	}
	if err := p.copyDelay(ctx); err != nil {
		return err
	}
	size := src.Pool.Size(src.Volume)
	return p.change(ctx, v, func(r *simRecord) error {
		p.commit(v, r)
		r.Size = size
		return nil
	})
}

func (p *simPool) Clear(ctx context.Context, v Volume) error {
	if !v.SaveOnStop {
		return fmt.Errorf("%w: import_data of %s (not save_on_stop)", ErrNotSupported, v.VID)
	}
	return p.change(ctx, v, func(r *simRecord) error {
		p.commit(v, r)
		return nil
	})
}

func (p *simPool) Start(ctx context.Context, v Volume, _ *Source) error {
	r, _ := p.store.get(p.name, v.VID)
	if r == nil || !r.Dirty {
		// A new snapshot (or an emptied volatile volume) takes room, and a snapshot of
		// a source is a copy.
		if p.faults.get().Full {
			return p.full()
		}
		if v.SnapOnStart {
			if err := p.copyDelay(ctx); err != nil {
				return err
			}
		}
	}
	return p.change(ctx, v, func(r *simRecord) error {
		r.Dirty = v.SaveOnStop
		return nil
	})
}

// Verify: a simulated volume's data is metadata only, never missing.
func (p *simPool) Verify(Volume, *Source) error { return nil }

func (p *simPool) IsDirty(v Volume) bool {
	r, _ := p.store.get(p.name, v.VID)
	return v.SaveOnStop && r != nil && r.Dirty
}

func (p *simPool) Discard(ctx context.Context, v Volume) error {
	return p.store.change(ctx, p.name, v.VID, func(cur *simRecord) (*simRecord, error) {
		if cur != nil {
			cur.Dirty = false
		}
		return cur, nil
	})
}

func (p *simPool) Stop(ctx context.Context, v Volume) error {
	return p.change(ctx, v, func(r *simRecord) error {
		if r.Dirty && v.RevisionsToKeep != -1 {
			p.commit(v, r)
		}
		r.Dirty = false
		return nil
	})
}
