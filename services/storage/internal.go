package storage

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/qerr"
	"github.com/qubesbus/qubesbus/schemas/config"
	storageapi "github.com/qubesbus/qubesbus/schemas/storage"
)

// The volume side of admin.vm.Create*, Remove and Start, asked for by properties and
// vmlifecycle while they serve those calls (schemas/storage explains why these are
// calls and not reactions to events).

// internalEndpoints adds the service's internal operations to svc.
func (s *Service) internalEndpoints(ctx context.Context, nc *nats.Conn, svc micro.Service) error {
	for op, f := range map[string]func(context.Context, storageapi.VolumesRequest) error{
		storageapi.OpCreate:  s.createVolumes,
		storageapi.OpRemove:  s.removeVolumes,
		storageapi.OpVerify:  s.verifyVolumes,
		storageapi.OpPrepare: s.prepareVolumes,
		storageapi.OpStop:    s.stopVolumes,
	} {
		h := micro.HandlerFunc(func(r micro.Request) {
			go func() {
				var req storageapi.VolumesRequest
				var err error
				if jerr := json.Unmarshal(r.Data(), &req); jerr != nil || req.Qube == "" {
					err = qerr.Abort("storage " + op + ": malformed request")
				} else {
					wctx, cancel := context.WithTimeout(ctx, s.cfg.WriteTimeout)
					err = f(wctx, req)
					cancel()
				}
				if err != nil && errors.Is(err, qerr.ErrAbort) {
					s.log.Error("storage operation failed", "op", op, "qube", req.Qube, "err", err)
				}
				_ = r.RespondJSON(storageapi.ReplyFor(err))
			}()
		})
		detached := micro.HandlerFunc(func(r micro.Request) { h(bus.Detach(nc, r)) })
		if err := svc.AddEndpoint(storageapi.ServiceToken+"-"+op, detached, micro.WithEndpointSubject(s.cfg.Host.Service(storageapi.ServiceToken, op))); err != nil {
			return fmt.Errorf("add %s endpoint: %w", op, err)
		}
	}
	// A backup's reads: no write lock, they read committed data only.
	for op, f := range map[string]func(context.Context, storageapi.ExportRequest) (storageapi.ExportReply, error){
		storageapi.OpExport: s.exportVolume,
		storageapi.OpRead:   s.readVolume,
	} {
		h := micro.HandlerFunc(func(r micro.Request) {
			go func() {
				var req storageapi.ExportRequest
				var rep storageapi.ExportReply
				var err error
				if jerr := json.Unmarshal(r.Data(), &req); jerr != nil || req.Qube == "" || req.Volume == "" {
					err = qerr.Abort("storage " + op + ": malformed request")
				} else {
					rep, err = f(ctx, req)
				}
				if err != nil {
					if errors.Is(err, qerr.ErrAbort) {
						s.log.Error("storage export failed", "op", op, "qube", req.Qube, "volume", req.Volume, "err", err)
					}
					rep = storageapi.ExportReply{Reply: storageapi.ReplyFor(err)}
				}
				_ = r.RespondJSON(rep)
			}()
		})
		detached := micro.HandlerFunc(func(r micro.Request) { h(bus.Detach(nc, r)) })
		if err := svc.AddEndpoint(storageapi.ServiceToken+"-"+op, detached, micro.WithEndpointSubject(s.cfg.Host.Service(storageapi.ServiceToken, op))); err != nil {
			return fmt.Errorf("add %s endpoint: %w", op, err)
		}
	}
	// Lab faults go to every instance (each keeps its simulated pools): no queue group.
	sub, err := nc.Subscribe(s.cfg.Host.Lab(storageapi.LabOpFaults), func(m *nats.Msg) {
		var req storageapi.LabFaults
		rep := storageapi.LabReply{}
		if err := json.Unmarshal(m.Data, &req); err != nil || req.Pool == "" {
			rep.Error = "request must name a pool"
		} else {
			s.faultsOf(req.Pool).set(req.Faults)
		}
		data, _ := json.Marshal(rep)
		_ = m.Respond(data)
	})
	if err != nil {
		return fmt.Errorf("subscribe lab faults: %w", err)
	}
	context.AfterFunc(ctx, func() { _ = sub.Unsubscribe() })
	return nil
}

// faults of simulated pools, by pool name.
type faultTable struct {
	mu sync.Mutex
	m  map[string]*simFaults
}

func (s *Service) faultsOf(pool string) *simFaults {
	s.faults.mu.Lock()
	defer s.faults.mu.Unlock()
	if s.faults.m == nil {
		s.faults.m = map[string]*simFaults{}
	}
	f := s.faults.m[pool]
	if f == nil {
		f = &simFaults{}
		s.faults.m[pool] = f
	}
	return f
}

// requestVolumes reads the volumes a create or remove request carries, with the
// pools of the caller's revision.
func (s *Service) requestVolumes(ctx context.Context, req storageapi.VolumesRequest) ([]Volume, []config.Pool, error) {
	if err := s.rep.WaitRevision(ctx, req.Revision); err != nil {
		return nil, nil, fmt.Errorf("%w: %w", qerr.ErrAbort, err)
	}
	vols, err := parseVolumeConfig(config.RawXML(req.VolumeConfig))
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %w", qerr.ErrAbort, err)
	}
	return vols, s.poolsView(), nil
}

// createVolumes is qubesd's Storage.create for a new qube: every volume is created in
// its pool; if one fails, those made are removed again and the error is the call's.
func (s *Service) createVolumes(ctx context.Context, req storageapi.VolumesRequest) error {
	vols, pools, err := s.requestVolumes(ctx, req)
	if err != nil {
		return err
	}
	s.wmu.Lock()
	defer s.wmu.Unlock()
	var made []Volume
	var madeIn []Pool
	for _, v := range vols {
		p, err := s.poolOf(pools, v)
		if err == nil {
			v = effective(p, v)
			err = p.Create(ctx, v)
		}
		if err != nil {
			for i := len(made) - 1; i >= 0; i-- {
				if rerr := madeIn[i].Remove(context.WithoutCancel(ctx), made[i]); rerr != nil {
					s.log.Error("remove a volume of a failed create", "qube", req.Qube, "vid", made[i].VID, "err", rerr)
				}
			}
			return driverError(err)
		}
		made, madeIn = append(made, v), append(madeIn, p)
	}
	return nil
}

// removeVolumes is qubesd's Storage.remove: every volume's data goes; failures are
// logged and do not fail the removal.
func (s *Service) removeVolumes(ctx context.Context, req storageapi.VolumesRequest) error {
	vols, pools, err := s.requestVolumes(ctx, req)
	if err != nil {
		return err
	}
	s.wmu.Lock()
	defer s.wmu.Unlock()
	for _, v := range vols {
		p, err := s.poolOf(pools, v)
		if err == nil {
			err = p.Remove(ctx, effective(p, v))
		}
		if err != nil {
			s.log.Error("remove volume", "qube", req.Qube, "volume", v.Name, "vid", v.VID, "err", err)
		}
	}
	return nil
}

// prepareVolumes is qubesd's Storage.start before a qube's domain is created: a
// snapshot whose source has snapshots disabled and runs is refused, then every volume
// starts. If one fails, the volumes this call started are discarded (those that
// were dirty already stay as they were) and the error is the start's.
// verifyVolumes is qubesd's Storage.verify: each volume in order, the first missing
// image fails the start.
func (s *Service) verifyVolumes(ctx context.Context, req storageapi.VolumesRequest) error {
	s.follow.settle(ctx) // a stop just before commits first
	s.wmu.Lock()
	defer s.wmu.Unlock()
	q, err := s.qubeVolumes(req.Qube)
	if err != nil {
		return err
	}
	for _, v := range q.vols {
		p, err := s.poolOf(q.pools, v)
		if err != nil {
			return err
		}
		v = effective(p, v)
		if err := p.Verify(v, s.source(q.pools, v)); err != nil {
			return driverError(fmt.Errorf("%s: %w", v.Name, err))
		}
	}
	return nil
}

func (s *Service) prepareVolumes(ctx context.Context, req storageapi.VolumesRequest) error {
	s.follow.settle(ctx) // a stop just before commits first
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if err := s.syncSim(ctx); err != nil {
		return err
	}
	q, err := s.qubeVolumes(req.Qube)
	if err != nil {
		return err
	}
	type started struct {
		v Volume
		p Pool
	}
	var todo []started
	for _, v := range q.vols {
		p, err := s.poolOf(q.pools, v)
		if err != nil {
			return err
		}
		v = effective(p, v)
		if src := s.source(q.pools, v); src != nil && snapshotsDisabled(src.Volume) && src.Pool.IsDirty(src.Volume) {
			return qerr.VMError("Volume " + src.Volume.VID + " is running")
		}
		todo = append(todo, started{v, p})
	}
	var done []started
	for _, t := range todo {
		wasDirty := t.p.IsDirty(t.v)
		if err := t.p.Start(ctx, t.v, s.source(q.pools, t.v)); err != nil {
			for i := len(done) - 1; i >= 0; i-- {
				if derr := done[i].p.Discard(context.WithoutCancel(ctx), done[i].v); derr != nil {
					s.log.Error("discard a volume of a failed start", "qube", req.Qube, "vid", done[i].v.VID, "err", derr)
				}
			}
			return driverError(fmt.Errorf("%s: %w", t.v.Name, err))
		}
		if !wasDirty {
			done = append(done, t)
		}
	}
	return nil
}

// snapshotsDisabled is Volume.snapshots_disabled: the volume is used in place.
func snapshotsDisabled(v Volume) bool {
	return v.RevisionsToKeep == -1 && !v.SnapOnStart && v.SaveOnStop
}

// stopVolumes is qubesd's Storage.stop after a start that failed once the volumes
// were prepared (the domain could not be created): as after a shutdown.
func (s *Service) stopVolumes(ctx context.Context, req storageapi.VolumesRequest) error {
	return s.followPower(ctx, req.Qube, false)
}
