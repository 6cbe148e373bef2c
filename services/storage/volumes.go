package storage

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/qubesbus/qubesbus/bus/cloudevent"
	"github.com/qubesbus/qubesbus/bus/qerr"
	"github.com/qubesbus/qubesbus/bus/rpc"
	"github.com/qubesbus/qubesbus/schemas/config"
)

// qubeVolumes is what a volume call reads of its destination: its volumes, the
// configuration revision they come from, and its domain id.
type qubeVolumes struct {
	rev   uint64
	id    string
	class string
	vols  []Volume
	pools []config.Pool
}

func (s *Service) qubeVolumes(name string) (qubeVolumes, error) {
	var q qubeVolumes
	var err error
	// The revision comes with the view: asking the replica for it here would take its
	// read lock a second time, which deadlocks once a writer waits between the two.
	s.rep.ViewIndexedAt(func(rev uint64, c *config.Config, byName func(string) *config.Domain) {
		q.rev = rev
		d := byName(name)
		if d == nil {
			err = qerr.VMNotFoundError("No such domain: " + qerr.Repr(name))
			return
		}
		q.id, q.class = d.ID, d.Class
		if q.vols, err = parseVolumeConfig(d.VolumeConfig); err != nil {
			err = fmt.Errorf("%w: %w", qerr.ErrAbort, err)
			return
		}
		q.pools = make([]config.Pool, len(c.Pools))
		for i, p := range c.Pools {
			q.pools[i] = config.Pool{Attrs: slices.Clone(p.Attrs)}
		}
	})
	return q, err
}

// volume returns the volume the argument names (enforce_arg with the qube's volumes).
func (q qubeVolumes) volume(c *rpc.Call) (int, Volume, error) {
	for i, v := range q.vols {
		if v.Name == c.Arg {
			return i, v, nil
		}
	}
	return -1, Volume{}, qerr.PermissionDenied("Argument not in " + qerr.Repr(c.Dest.Name+" volumes"))
}

// poolOf opens a volume's pool.
func (s *Service) poolOf(pools []config.Pool, v Volume) (Pool, error) {
	pc, ok := findPool(pools, v.Pool)
	if !ok {
		return nil, fmt.Errorf("%w: volume %s in unknown pool %q", qerr.ErrAbort, v.VID, v.Pool)
	}
	p, err := s.pool(pc)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", qerr.ErrAbort, err)
	}
	return p, nil
}

// source finds the volume a snap_on_start volume snapshots: the volume of that vid
// in the same pool.
func (s *Service) source(pools []config.Pool, v Volume) *Source {
	if v.Source == "" {
		return nil
	}
	sv, ok := s.findVolume(v.Pool, v.Source)
	if !ok {
		return nil
	}
	p, err := s.poolOf(pools, sv)
	if err != nil {
		return nil
	}
	return &Source{Volume: sv, Pool: p}
}

// findVolume returns the volume of a vid in a pool. qubesd lays vids out as
// <dir>/<qube>/<volume>, so the qube the vid names is tried first (one lookup, whatever
// the number of qubes); every qube is searched only when that misses.
func (s *Service) findVolume(pool, vid string) (Volume, bool) {
	if parts := strings.Split(vid, "/"); len(parts) == 3 {
		var raw config.RawXML
		s.rep.ViewIndexed(func(_ *config.Config, byName func(string) *config.Domain) {
			if d := byName(parts[1]); d != nil {
				raw = d.VolumeConfig
			}
		})
		vols, _ := parseVolumeConfig(raw)
		for _, v := range vols {
			if v.Pool == pool && v.VID == vid {
				return v, true
			}
		}
	}
	for _, dv := range s.allVolumes(false) {
		if dv.vol.Pool == pool && dv.vol.VID == vid {
			return dv.vol, true
		}
	}
	return Volume{}, false
}

func (s *Service) volumeList(_ context.Context, c *rpc.Call) ([]byte, error) {
	q, err := s.qubeVolumes(c.Dest.Name)
	if err != nil {
		return nil, err
	}
	names := make([]string, len(q.vols))
	for i, v := range q.vols {
		names[i] = v.Name
	}
	return lines(names), nil
}

// effective applies what a pool imposes on its volumes' settings (a kernel volume is
// read-only with no revisions).
func effective(p Pool, v Volume) Volume {
	if _, ok := p.(*kernelPool); ok {
		v.RW, v.RevisionsToKeep = false, 0
	}
	return v
}

// ephemeral is Volume.ephemeral: the explicit value, else the pool's
// ephemeral_volatile for a writable volume that is neither snapshot nor saved.
func ephemeral(p Pool, v Volume) bool {
	if v.Ephemeral != nil {
		return *v.Ephemeral
	}
	if v.SnapOnStart || v.SaveOnStop || !v.RW {
		return false
	}
	e, _ := p.Config().Get("ephemeral_volatile")
	b, _ := parseBool(e)
	return b
}

func (s *Service) volumeInfo(ctx context.Context, c *rpc.Call) ([]byte, error) {
	if err := s.syncSim(ctx); err != nil {
		return nil, err
	}
	q, err := s.qubeVolumes(c.Dest.Name)
	if err != nil {
		return nil, err
	}
	_, v, err := q.volume(c)
	if err != nil {
		return nil, err
	}
	p, err := s.poolOf(q.pools, v)
	if err != nil {
		return nil, err
	}
	v = effective(p, v)
	var b strings.Builder
	kv := func(k, val string) { b.WriteString(k + "=" + val + "\n") }
	kv("pool", v.Pool)
	kv("vid", v.VID)
	kv("size", strconv.FormatInt(p.Size(v), 10))
	kv("usage", strconv.FormatInt(p.UsageOf(v), 10))
	kv("rw", pyBool(v.RW))
	kv("source", v.Source)
	kv("path", p.Path(v))
	kv("save_on_stop", pyBool(v.SaveOnStop))
	kv("snap_on_start", pyBool(v.SnapOnStart))
	kv("revisions_to_keep", strconv.Itoa(v.RevisionsToKeep))
	kv("ephemeral", pyBool(ephemeral(p, v)))
	kv("is_outdated", pyBool(p.IsOutdated(v, s.source(q.pools, v))))
	return []byte(b.String()), nil
}

// revisions returns a volume's revision ids sorted by time (ListSnapshots).
func revisions(p Pool, v Volume) ([]string, error) {
	revs, err := p.Revisions(v)
	if err != nil {
		return nil, fmt.Errorf("%w: revisions of %s: %w", qerr.ErrAbort, v.VID, err)
	}
	sort.SliceStable(revs, func(i, j int) bool { return isodate(revs[i].Time) < isodate(revs[j].Time) })
	ids := make([]string, len(revs))
	for i, r := range revs {
		ids[i] = r.ID
	}
	return ids, nil
}

func (s *Service) volumeListSnapshots(ctx context.Context, c *rpc.Call) ([]byte, error) {
	s.follow.settle(ctx)
	if err := s.syncSim(ctx); err != nil {
		return nil, err
	}
	q, err := s.qubeVolumes(c.Dest.Name)
	if err != nil {
		return nil, err
	}
	_, v, err := q.volume(c)
	if err != nil {
		return nil, err
	}
	p, err := s.poolOf(q.pools, v)
	if err != nil {
		return nil, err
	}
	ids, err := revisions(p, v)
	if err != nil {
		return nil, err
	}
	return lines(ids), nil
}

// volumeWrite runs a volume change under the write lock: f checks the call, changes
// the pool's data and returns the new settings of the volume (nil: unchanged) and the
// events to publish; the settings go to the change log (apply). New settings and
// events f returns with its error (a resize done before the online step failed) are
// kept.
func (s *Service) volumeWrite(ctx context.Context, c *rpc.Call,
	f func(q qubeVolumes, v Volume, p Pool) (*Volume, []cloudevent.Event, error)) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.WriteTimeout)
	defer cancel()
	s.follow.settle(ctx)
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if err := s.syncSim(ctx); err != nil {
		return nil, err
	}
	q, err := s.qubeVolumes(c.Dest.Name)
	if err != nil {
		return nil, err
	}
	i, v, err := q.volume(c)
	if err != nil {
		return nil, err
	}
	p, err := s.poolOf(q.pools, v)
	if err != nil {
		return nil, err
	}
	nv, evs, err := f(q, v, p)
	if nv != nil && !sameVolume(*nv, v) {
		vols := slices.Clone(q.vols)
		vols[i] = *nv
		op := config.Op{Kind: config.OpSetVolumeConfig, Domain: q.id, Value: string(renderVolumeConfig(vols))}
		if aerr := s.apply(ctx, q.rev, []config.Op{op}); aerr != nil {
			// The data changed but the settings could not follow: abort, as qubesd
			// does when its save fails.
			return nil, aerr
		}
	}
	if perr := s.publish(ctx, evs...); perr != nil {
		return nil, perr
	}
	if err != nil {
		return nil, driverError(err)
	}
	return nil, nil
}

// driverError maps a driver's error to the call's outcome: qubesd's exceptions pass,
// anything else (NotImplementedError, OSError) aborts as in qubesd.
func driverError(err error) error {
	var qe *qerr.Error
	if errors.As(err, &qe) || errors.Is(err, qerr.ErrAbort) {
		return err
	}
	return fmt.Errorf("%w: %w", qerr.ErrAbort, err)
}

func (s *Service) volumeResize(ctx context.Context, c *rpc.Call) ([]byte, error) {
	q, err := s.qubeVolumes(c.Dest.Name)
	if err != nil {
		return nil, err
	}
	if _, _, err := q.volume(c); err != nil {
		return nil, err
	}
	size, err := validateNumber(bytes.TrimSpace(c.Payload), "volume size", false)
	if err != nil {
		return nil, err
	}
	return s.volumeWrite(ctx, c, func(_ qubeVolumes, v Volume, p Pool) (*Volume, []cloudevent.Event, error) {
		if err := p.Resize(ctx, effective(p, v), size); err != nil {
			return nil, nil, err
		}
		v.Size = size
		evs, err := s.resizeOnline(ctx, c.Dest.Name, v.Name)
		return &v, evs, err
	})
}

// resizeOnline is the step of qubesd's Storage.resize after the driver's: a running
// qube is asked to grow its filesystem (qubes.ResizeDisk over qrexec, as root), which
// qubesd announces with domain-cmd-pre-run. The volume stays resized whatever this
// answers. A paused qube refuses (run_service), one whose qrexec is not up yet
// (starting) fails; a host without Xen runs no service in a qube, so the call succeeds
// there as qubesd's does with the oracle's qrexec-client stand-in (exit 0).
func (s *Service) resizeOnline(ctx context.Context, qube, volume string) ([]cloudevent.Event, error) {
	states, err := s.life.PowerStates(ctx)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", qerr.ErrAbort, err)
	}
	switch st, ok := states[qube]; {
	case !ok || st == "Halted":
		return nil, nil
	case st == "Paused":
		return nil, qerr.VMNotRunningError("Domain " + qerr.Repr(qube) + " is paused")
	case st == "Transient":
		return nil, qerr.VMError("Domain " + qerr.Repr(qube) + ": qrexec not connected")
	}
	s.log.Debug("online resize", "qube", qube, "volume", volume, "service", "qubes.ResizeDisk")
	return []cloudevent.Event{cloudevent.New(qube, "domain-cmd-pre-run", "start_guid", "False")}, nil
}

const revisionChars = letters + digits + ":-_."

func (s *Service) volumeRevert(ctx context.Context, c *rpc.Call) ([]byte, error) {
	return s.volumeWrite(ctx, c, func(_ qubeVolumes, v Volume, p Pool) (*Volume, []cloudevent.Event, error) {
		if !isASCII(c.Payload) {
			return nil, nil, qerr.Abort("revision is not ASCII")
		}
		rev := strings.TrimSpace(string(c.Payload))
		if !allIn(rev, revisionChars) {
			return nil, nil, qerr.ProtocolError("Revision name must be in safe set: " + revisionChars)
		}
		ids, err := revisions(p, v)
		if err != nil {
			return nil, nil, err
		}
		if !slices.Contains(ids, rev) {
			return nil, nil, qerr.Abort("no revision " + rev) // qubesd fails unhandled here
		}
		if err := p.Revert(ctx, effective(p, v), rev); err != nil {
			return nil, nil, err
		}
		return nil, nil, nil
	})
}

func (s *Service) volumeClear(ctx context.Context, c *rpc.Call) ([]byte, error) {
	return s.volumeWrite(ctx, c, func(_ qubeVolumes, v Volume, p Pool) (*Volume, []cloudevent.Event, error) {
		size := strconv.FormatInt(p.Size(v), 10)
		if err := p.Clear(ctx, effective(p, v)); err != nil {
			return nil, nil, err
		}
		return nil, []cloudevent.Event{
			cloudevent.New(c.Dest.Name, "domain-volume-import-begin", "volume", v.Name, "size", size),
			cloudevent.New(c.Dest.Name, "domain-volume-import-end", "volume", v.Name, "success", "True"),
		}, nil
	})
}

func (s *Service) volumeSetRevisions(ctx context.Context, c *rpc.Call) ([]byte, error) {
	q, err := s.qubeVolumes(c.Dest.Name)
	if err != nil {
		return nil, err
	}
	if _, _, err := q.volume(c); err != nil {
		return nil, err
	}
	n, err := validateNumber(c.Payload, "revisions to keep", true)
	if err != nil {
		return nil, err
	}
	return s.volumeWrite(ctx, c, func(_ qubeVolumes, v Volume, p Pool) (*Volume, []cloudevent.Event, error) {
		if n < -1 {
			return nil, nil, qerr.ValueError("Invalid value for revisions_to_keep")
		}
		if _, ok := p.(*kernelPool); ok {
			if n != 0 {
				return nil, nil, qerr.ValueError("LinuxModules supports only revisions_to_keep=0")
			}
			return nil, nil, nil
		}
		if int(n) != v.RevisionsToKeep && (n == -1 || v.RevisionsToKeep == -1) {
			if err := s.halted(ctx, c.Dest.Name); err != nil {
				return nil, nil, err
			}
		}
		v.RevisionsToKeep = int(n)
		return &v, nil, nil
	})
}

// boolSetting checks a volume setting call in qubesd's order (the qube, the volume,
// then the payload) and returns the payload's boolean.
func (s *Service) boolSetting(c *rpc.Call) (bool, error) {
	q, err := s.qubeVolumes(c.Dest.Name)
	if err != nil {
		return false, err
	}
	if _, _, err := q.volume(c); err != nil {
		return false, err
	}
	return payloadBool(c.Payload)
}

func (s *Service) volumeSetRW(ctx context.Context, c *rpc.Call) ([]byte, error) {
	b, err := s.boolSetting(c)
	if err != nil {
		return nil, err
	}
	return s.volumeWrite(ctx, c, func(_ qubeVolumes, v Volume, p Pool) (*Volume, []cloudevent.Event, error) {
		if err := s.halted(ctx, c.Dest.Name); err != nil {
			return nil, nil, err
		}
		if _, ok := p.(*kernelPool); ok {
			return nil, nil, nil // a kernel volume stays read-only
		}
		v.RW = b
		return &v, nil, nil
	})
}

func (s *Service) volumeSetEphemeral(ctx context.Context, c *rpc.Call) ([]byte, error) {
	b, err := s.boolSetting(c)
	if err != nil {
		return nil, err
	}
	return s.volumeWrite(ctx, c, func(_ qubeVolumes, v Volume, p Pool) (*Volume, []cloudevent.Event, error) {
		ev := effective(p, v)
		if b && (ev.SnapOnStart || ev.SaveOnStop || !ev.RW) {
			return nil, nil, qerr.ValueError("Cannot enable ephemeral on snap_on_start or save_on_stop or non-dom0 or not writable volume")
		}
		v.Ephemeral = &b
		return &v, nil, nil
	})
}

// halted refuses a change to a qube that is not halted.
func (s *Service) halted(ctx context.Context, name string) error {
	states, err := s.life.PowerStates(ctx)
	if err != nil {
		return fmt.Errorf("%w: %w", qerr.ErrAbort, err)
	}
	if st, ok := states[name]; ok && st != "Halted" {
		return qerr.VMNotHaltedError("Domain is not powered off: " + qerr.Repr(name))
	}
	return nil
}

func sameVolume(a, b Volume) bool {
	ea, eb := a.Ephemeral, b.Ephemeral
	a.Ephemeral, b.Ephemeral = nil, nil
	if a != b || (ea == nil) != (eb == nil) {
		return false
	}
	return ea == nil || *ea == *eb
}
