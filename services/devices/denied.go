package devices

import (
	"context"
	"slices"
	"strings"

	"github.com/qubesbus/qubesbus/bus/cloudevent"
	"github.com/qubesbus/qubesbus/bus/qerr"
	"github.com/qubesbus/qubesbus/bus/rpc"
	"github.com/qubesbus/qubesbus/schemas/config"
	"github.com/qubesbus/qubesbus/schemas/device"
	"github.com/qubesbus/qubesbus/schemas/model"
)

// denied is a qube's devices_denied property split in interface codes.
func denied(m *model.Model, vm string) (model.Holder, []string, error) {
	h, err := m.Holder(vm)
	if err != nil {
		return h, nil, err
	}
	v, _ := m.Value(h, "devices_denied")
	codes, err := device.ParseInterfaces(v.Text)
	if err != nil {
		return h, nil, qerr.ValueError(err.Error())
	}
	return h, codes, nil
}

func (s *Service) deniedList(ctx context.Context, c *rpc.Call) ([]byte, error) {
	var out string
	err := s.view(nil, func(m *model.Model) error {
		_, codes, err := denied(m, c.Dest.Name)
		out = strings.Join(codes, "\n")
		return err
	})
	return []byte(out), err
}

// parseDeniedPayload is qubesd's reading of a denied.Add/Remove payload.
func parseDeniedPayload(payload []byte, all []string) ([]string, error) {
	if !isASCII(payload) {
		return nil, qerr.ProtocolError("Device interface contains non-ASCII characters")
	}
	var codes []string
	if all != nil && string(payload) == "all" {
		codes = slices.Clone(all)
	} else {
		var err error
		if codes, err = device.ParseInterfaces(string(payload)); err != nil {
			return nil, qerr.ValueError(err.Error())
		}
	}
	seen := map[string]bool{}
	for _, c := range codes {
		if seen[c] {
			return nil, qerr.ProtocolError("Duplicated device interfaces in payload.")
		}
		seen[c] = true
	}
	return codes, nil
}

// setDenied sets devices_denied through the properties model (its setter sorts and
// checks the codes; its events are qubesd's). qubesd fires the property events even
// when nothing changes, and saves only when something did.
func setDenied(m *model.Model, h model.Holder, text string, old string, pre func(...cloudevent.Event) error) ([]config.Op, []cloudevent.Event, error) {
	ch, err := m.Set(h, "devices_denied", []byte(text))
	if err != nil {
		return nil, nil, err
	}
	if err := pre(toEvents(ch.Pre)...); err != nil {
		return nil, nil, err
	}
	if ch.Err != nil {
		return nil, nil, ch.Err
	}
	ops := ch.Ops
	if text == old {
		ops = nil
	}
	return ops, toEvents(ch.Post), nil
}

func toEvents(evs []model.Event) []cloudevent.Event {
	out := make([]cloudevent.Event, len(evs))
	for i, e := range evs {
		out[i] = cloudevent.New(e.VM, e.Name, e.Kwargs...)
	}
	return out
}

func (s *Service) deniedAdd(ctx context.Context, c *rpc.Call) ([]byte, error) {
	add, err := parseDeniedPayload(c.Payload, nil)
	if err != nil {
		return nil, err
	}
	return nil, s.change(ctx, true, func(m *model.Model, pre func(...cloudevent.Event) error) ([]config.Op, []cloudevent.Event, error) {
		h, codes, err := denied(m, c.Dest.Name)
		if err != nil {
			return nil, nil, err
		}
		old := strings.Join(codes, "")
		// The setter de-duplicates and sorts; compare with what it will store.
		merged := map[string]bool{}
		for _, x := range append(slices.Clone(codes), add...) {
			merged[x] = true
		}
		keys := make([]string, 0, len(merged))
		for k := range merged {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		ops, post, err := setDenied(m, h, old+strings.Join(add, ""), old, pre)
		if strings.Join(keys, "") == old {
			ops = nil
		}
		return ops, post, err
	})
}

func (s *Service) deniedRemove(ctx context.Context, c *rpc.Call) ([]byte, error) {
	return nil, s.change(ctx, true, func(m *model.Model, pre func(...cloudevent.Event) error) ([]config.Op, []cloudevent.Event, error) {
		h, codes, err := denied(m, c.Dest.Name)
		if err != nil {
			return nil, nil, err
		}
		remove, err := parseDeniedPayload(c.Payload, codes)
		if err != nil {
			return nil, nil, err
		}
		old := strings.Join(codes, "")
		kept := slices.DeleteFunc(slices.Clone(codes), func(x string) bool { return slices.Contains(remove, x) })
		text := strings.Join(kept, "")
		if text == old {
			return nil, nil, nil
		}
		return setDenied(m, h, text, old, pre)
	})
}
