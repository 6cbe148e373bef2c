package properties

import (
	"context"
	"fmt"
	"strconv"

	"github.com/qubesbus/qubesbus/bus/qerr"
	"github.com/qubesbus/qubesbus/bus/rpc"
	"github.com/qubesbus/qubesbus/schemas/model"
)

// runtimeProps are the properties whose values come from the lifecycle service.
var runtimeProps = map[string]bool{"xid": true, "stubdom_xid": true, "stubdom_uuid": true, "start_time": true}

func (s *Service) propertyList(ctx context.Context, c *rpc.Call) ([]byte, error) {
	return s.read(ctx, c, false, func(_ *model.Model, h model.Holder) ([]byte, error) {
		return []byte(model.ListText(h.Class())), nil
	})
}

func (s *Service) propertyGet(ctx context.Context, c *rpc.Call) ([]byte, error) {
	return s.read(ctx, c, runtimeProps[c.Arg], func(m *model.Model, h model.Holder) ([]byte, error) {
		r, err := m.Get(h, c.Arg)
		if err != nil {
			return nil, err
		}
		return []byte(r.Text()), nil
	})
}

func (s *Service) propertyGetAll(ctx context.Context, c *rpc.Call) ([]byte, error) {
	if c.Method.Name == "admin.property.GetAll" {
		return s.read(ctx, c, false, func(m *model.Model, h model.Holder) ([]byte, error) {
			return []byte(m.GetAllText(h)), nil
		})
	}
	// Runtime values (xid, start_time, …) exist only on qubes, not on the app object.
	// qvm-ls asks for every qube's: kept until the configuration or runtime changes.
	return s.cachedRuntimeRead(ctx, c, func(m *model.Model) ([]byte, error) {
		return getAllText(m, c.Dest.Name)
	})
}

func (s *Service) propertyGetDefault(ctx context.Context, c *rpc.Call) ([]byte, error) {
	return s.read(ctx, c, runtimeProps[c.Arg], func(m *model.Model, h model.Holder) ([]byte, error) {
		s, err := m.Spec(h, c.Arg)
		if err != nil {
			return nil, err
		}
		v, ok, _ := m.Default(h, c.Arg)
		if !ok {
			return nil, nil
		}
		return []byte("type=" + s.Type + " " + v.String()), nil
	})
}

func (s *Service) propertyHelp(ctx context.Context, c *rpc.Call) ([]byte, error) {
	return s.read(ctx, c, false, func(m *model.Model, h model.Holder) ([]byte, error) {
		s, err := m.Spec(h, c.Arg)
		if err != nil {
			return nil, err
		}
		return []byte(s.Help), nil
	})
}

func (s *Service) propertySet(ctx context.Context, c *rpc.Call) ([]byte, error) {
	return s.write(ctx, c, func(m *model.Model, h model.Holder) (*model.Change, error) {
		return m.Set(h, c.Arg, c.Payload)
	})
}

func (s *Service) propertyReset(ctx context.Context, c *rpc.Call) ([]byte, error) {
	return s.write(ctx, c, func(m *model.Model, h model.Holder) (*model.Change, error) {
		return m.Reset(h, c.Arg)
	})
}

func (s *Service) featureList(ctx context.Context, c *rpc.Call) ([]byte, error) {
	return s.read(ctx, c, false, func(_ *model.Model, h model.Holder) ([]byte, error) {
		return []byte(model.FeatureListText(h.D)), nil
	})
}

// featureCheck serves feature.Get and the feature.CheckWith* methods.
func (s *Service) featureCheck(template, netvm, adminVM bool) rpc.Handler {
	return func(ctx context.Context, c *rpc.Call) ([]byte, error) {
		return s.read(ctx, c, false, func(m *model.Model, h model.Holder) ([]byte, error) {
			v, ok := m.CheckFeature(h.D, c.Arg, template, netvm, adminVM)
			if !ok {
				return nil, model.FeatureNotFound(h.D.Name(), c.Arg)
			}
			return []byte(v), nil
		})
	}
}

func (s *Service) featureSet(ctx context.Context, c *rpc.Call) ([]byte, error) {
	return s.write(ctx, c, func(m *model.Model, h model.Holder) (*model.Change, error) {
		return m.FeatureSet(h.D, c.Arg, c.Payload)
	})
}

func (s *Service) featureRemove(ctx context.Context, c *rpc.Call) ([]byte, error) {
	return s.write(ctx, c, func(m *model.Model, h model.Holder) (*model.Change, error) {
		return m.FeatureRemove(h.D, c.Arg)
	})
}

func (s *Service) tagList(ctx context.Context, c *rpc.Call) ([]byte, error) {
	return s.read(ctx, c, false, func(_ *model.Model, h model.Holder) ([]byte, error) {
		return []byte(model.TagListText(h.D)), nil
	})
}

func (s *Service) tagGet(ctx context.Context, c *rpc.Call) ([]byte, error) {
	return s.read(ctx, c, false, func(_ *model.Model, h model.Holder) ([]byte, error) {
		if err := model.ValidateTag(c.Arg); err != nil {
			return nil, err
		}
		if model.HasTag(h.D, c.Arg) {
			return []byte("1"), nil
		}
		return []byte("0"), nil
	})
}

func (s *Service) tagSet(ctx context.Context, c *rpc.Call) ([]byte, error) {
	return s.write(ctx, c, func(m *model.Model, h model.Holder) (*model.Change, error) {
		return m.TagSet(c.Source.Name, h.D, c.Arg)
	})
}

func (s *Service) tagRemove(ctx context.Context, c *rpc.Call) ([]byte, error) {
	return s.write(ctx, c, func(m *model.Model, h model.Holder) (*model.Change, error) {
		return m.TagRemove(c.Source.Name, h.D, c.Arg)
	})
}

func (s *Service) labelList(ctx context.Context, c *rpc.Call) ([]byte, error) {
	var names []string
	for _, l := range s.rep.Labels() {
		names = append(names, l.Name)
	}
	return lines(names), nil
}

func (s *Service) labelGet(ctx context.Context, c *rpc.Call) ([]byte, error) {
	return s.view(nil, func(m *model.Model) ([]byte, error) {
		l, err := m.FindLabel(c.Arg)
		if err != nil {
			return nil, err
		}
		s.lmu.Lock()
		fresh := s.newLabels[l.Name]
		s.lmu.Unlock()
		if fresh {
			// qubesd holds the colour of a label created since it started as bytes and
			// fails to answer until it restarts.
			return nil, qerr.Abort("label colour of a label created in this run")
		}
		return []byte(l.Color), nil
	})
}

func (s *Service) labelIndex(ctx context.Context, c *rpc.Call) ([]byte, error) {
	return s.view(nil, func(m *model.Model) ([]byte, error) {
		l, err := m.FindLabel(c.Arg)
		if err != nil {
			return nil, err
		}
		return []byte(strconv.Itoa(l.Index)), nil
	})
}

func (s *Service) labelCreate(ctx context.Context, c *rpc.Call) ([]byte, error) {
	out, err := s.write(ctx, c, func(m *model.Model, _ model.Holder) (*model.Change, error) {
		return m.LabelCreate(c.Arg, c.Payload)
	})
	if err == nil {
		s.lmu.Lock()
		s.newLabels[c.Arg] = true
		s.lmu.Unlock()
	}
	return out, err
}

func (s *Service) labelRemove(ctx context.Context, c *rpc.Call) ([]byte, error) {
	out, err := s.write(ctx, c, func(m *model.Model, _ model.Holder) (*model.Change, error) {
		return m.LabelRemove(c.Arg)
	})
	if err == nil {
		s.lmu.Lock()
		delete(s.newLabels, c.Arg)
		s.lmu.Unlock()
	}
	return out, err
}

func (s *Service) create(class string, inPool bool) rpc.Handler {
	return func(ctx context.Context, c *rpc.Call) ([]byte, error) {
		return s.write(ctx, c, func(m *model.Model, _ model.Holder) (*model.Change, error) {
			return m.Create(model.CreateRequest{Class: class, InPool: inPool, Arg: c.Arg, Payload: c.Payload,
				Source: c.Source.Name, UUID: randomUUID(), DispID: randomBelow})
		})
	}
}

func (s *Service) createDisposable(ctx context.Context, c *rpc.Call) ([]byte, error) {
	return s.write(ctx, c, func(m *model.Model, _ model.Holder) (*model.Change, error) {
		return m.CreateDisposable(model.DisposableRequest{Source: c.Source.Name, Dest: c.Dest.Name, Arg: c.Arg,
			Payload: c.Payload, UUID: randomUUID(), DispID: randomBelow})
	})
}

func (s *Service) remove(ctx context.Context, c *rpc.Call) ([]byte, error) {
	// The qube's lifecycle lock is held from the halted check to the removal, so no
	// Start can slip in between (qubesd's single event loop gives that for free).
	after, release, err := s.life.Hold(ctx, c.Dest.Name)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", qerr.ErrAbort, err)
	}
	defer func() { release(s.rep.Revision()) }()
	c.After.Runtime = c.After.Runtime.Max(after)
	var uuid, volumeConfig string
	out, err := s.write(ctx, c, func(m *model.Model, h model.Holder) (*model.Change, error) {
		uuid, _ = h.D.Property("uuid")
		volumeConfig = string(h.D.VolumeConfig)
		return m.Remove(h.D)
	})
	if err == nil && s.cfg.Volumes != nil && volumeConfig != "" {
		// qubesd's remove_from_disk: after the qube left the configuration, before the
		// reply; failures are logged (by storage), not answered.
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.cfg.WriteTimeout)
		if verr := s.cfg.Volumes.RemoveVolumes(rctx, c.Dest.Name, volumeConfig, s.rep.Revision()); verr != nil {
			s.log.Error("remove volumes", "dest", c.Dest.Name, "err", verr)
		}
		cancel()
	}
	if err == nil && uuid != "" {
		// The qube is gone whether or not the caller still waits: remove its notes.
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.cfg.WriteTimeout)
		defer cancel()
		if rerr := s.notes.remove(rctx, uuid); rerr != nil {
			s.log.Warn("remove notes", "dest", c.Dest.Name, "err", rerr)
		}
	}
	return out, err
}
