package storage

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/qubesbus/qubesbus/bus/qerr"
	storageapi "github.com/qubesbus/qubesbus/schemas/storage"
)

// simDriver keeps volumes as metadata only (sizes, revisions), for labs of thousands
// of qubes. It also answers the lvm_thin and zfs driver names, whose pools need
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
	p := &simPool{driver: d.name, host: host, vols: map[string]*simVol{}, rtk: "1"}
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

	mu   sync.Mutex
	vols map[string]*simVol
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
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

type simVol struct {
	size  int64
	dirty bool
	revs  []Revision
	next  int
}

var _ Pool = (*simPool)(nil)

func (p *simPool) Config() PoolConfig            { return slices.Clone(p.cfg) }
func (p *simPool) Setup(context.Context) error   { return nil }
func (p *simPool) Destroy(context.Context) error { return nil }
func (p *simPool) DirPath() string               { return "" }
func (p *simPool) Listed() []string              { return nil }

func (p *simPool) Usage() (int64, int64, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	var used int64
	for _, v := range p.vols {
		used += v.size
	}
	return SimCapacity, min(used, SimCapacity), true
}

func (p *simPool) now() time.Time {
	if p.host.Stamp != nil {
		return *p.host.Stamp
	}
	return time.Now()
}

// vol returns the record of a volume, made from its settings on first use.
func (p *simPool) vol(v Volume) *simVol {
	sv := p.vols[v.VID]
	if sv == nil {
		sv = &simVol{size: v.Size, next: 1}
		p.vols[v.VID] = sv
	}
	return sv
}

func (p *simPool) Create(_ context.Context, v Volume) error {
	if v.SaveOnStop && !v.SnapOnStart && p.faults.get().Full {
		return p.full()
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.vols[v.VID] = &simVol{size: v.Size, next: 1}
	return nil
}

func (p *simPool) Remove(_ context.Context, v Volume) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.vols, v.VID)
	return nil
}

func (p *simPool) Size(v Volume) int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	if sv := p.vols[v.VID]; sv != nil {
		return sv.size
	}
	return v.Size
}

func (p *simPool) UsageOf(Volume) int64 { return 0 }
func (p *simPool) Path(v Volume) string { return "/dev/sim/" + p.name + "/" + v.VID }

func (p *simPool) Revisions(v Volume) ([]Revision, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if sv := p.vols[v.VID]; sv != nil {
		return slices.Clone(sv.revs), nil
	}
	return nil, nil
}

func (p *simPool) IsOutdated(Volume, *Source) bool { return false }

func (p *simPool) Resize(_ context.Context, v Volume, size int64) error {
	if !v.RW {
		return fmt.Errorf("%w: resize of %s", ErrReadOnly, v.VID)
	}
	f := p.faults.get()
	if f.ResizeFails != "" {
		return qerr.StoragePoolException(f.ResizeFails)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if f.Full && size > p.vol(v).size {
		return p.full()
	}
	p.vol(v).size = size
	return nil
}

// commit keeps the current data as a revision and drops those beyond the limit.
func (p *simPool) commit(v Volume, sv *simVol) {
	if v.RevisionsToKeep != 0 {
		sv.revs = append(sv.revs, Revision{ID: strconv.Itoa(sv.next), Time: p.now()})
		sv.next++
	}
	if keep := v.RevisionsToKeep; keep <= 0 {
		if keep == 0 {
			sv.revs = nil
		} else {
			sv.revs = sv.revs[min(-keep, len(sv.revs)):]
		}
	} else if len(sv.revs) > keep {
		sv.revs = slices.Clone(sv.revs[len(sv.revs)-keep:])
	}
}

func (p *simPool) Revert(_ context.Context, v Volume, revision string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	sv := p.vol(v)
	i := slices.IndexFunc(sv.revs, func(r Revision) bool { return r.ID == revision })
	if i < 0 {
		return fmt.Errorf("%w: %s", ErrNoRevision, revision)
	}
	sv.revs = slices.Delete(sv.revs, i, i+1)
	if v.RevisionsToKeep != 0 {
		sv.revs = append(sv.revs, Revision{ID: strconv.Itoa(sv.next), Time: p.now()})
		sv.next++
	}
	return nil
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
	p.mu.Lock()
	defer p.mu.Unlock()
	sv := p.vol(v)
	p.commit(v, sv)
	sv.size = size
	return nil
}

func (p *simPool) Clear(_ context.Context, v Volume) error {
	if !v.SaveOnStop {
		return fmt.Errorf("%w: import_data of %s (not save_on_stop)", ErrNotSupported, v.VID)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.commit(v, p.vol(v))
	return nil
}

func (p *simPool) Start(ctx context.Context, v Volume, _ *Source) error {
	p.mu.Lock()
	resume := p.vol(v).dirty
	p.mu.Unlock()
	if !resume {
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
	p.mu.Lock()
	defer p.mu.Unlock()
	p.vol(v).dirty = v.SaveOnStop
	return nil
}

// Verify: a simulated volume's data is metadata only, never missing.
func (p *simPool) Verify(Volume, *Source) error { return nil }

func (p *simPool) IsDirty(v Volume) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	sv := p.vols[v.VID]
	return v.SaveOnStop && sv != nil && sv.dirty
}

func (p *simPool) Discard(_ context.Context, v Volume) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if sv := p.vols[v.VID]; sv != nil {
		sv.dirty = false
	}
	return nil
}

func (p *simPool) Stop(_ context.Context, v Volume) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	sv := p.vol(v)
	if sv.dirty && v.RevisionsToKeep != -1 {
		p.commit(v, sv)
	}
	sv.dirty = false
	return nil
}
