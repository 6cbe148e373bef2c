package storage

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/cloudevent"
	"github.com/qubesbus/qubesbus/bus/rpc"
	"github.com/qubesbus/qubesbus/bus/subject"
)

// powerFollower makes volumes follow the power state: a durable consumer of the
// events stream, shared by every storage instance of the host (each event is handled
// once, in order), commits a qube's volumes on domain-shutdown. (Volumes are prepared
// before a start, when vmlifecycle asks: storageapi.OpPrepare.)
type powerFollower struct {
	s    *Service
	cons jetstream.Consumer
}

// PowerConsumer is the durable consumer of a host's storage instances.
func PowerConsumer(h subject.Host) string { return string(rpc.Storage) + "-power-" + h.ID() }

func followPower(ctx context.Context, js jetstream.JetStream, s *Service) (*powerFollower, error) {
	cfg := jetstream.ConsumerConfig{
		Durable: PowerConsumer(s.cfg.Host),
		// Only the event it acts on: settle waits for nothing else to be handled.
		FilterSubject: s.cfg.Host.EventOfEveryVM("domain-shutdown"),
		DeliverPolicy: jetstream.DeliverNewPolicy,
		AckPolicy:     jetstream.AckExplicitPolicy,
		MaxAckPending: 1, // in order
		AckWait:       30 * time.Second,
	}
	cons, err := bus.RetryJSFor(ctx, s.log, "consumer "+cfg.Durable, func(ctx context.Context) (jetstream.Consumer, error) {
		return js.CreateOrUpdateConsumer(ctx, cloudevent.StreamName, cfg)
	})
	if err != nil {
		return nil, fmt.Errorf("power-state consumer: %w", err)
	}
	f := &powerFollower{s: s, cons: cons}
	cc, err := cons.Consume(f.handle)
	if err != nil {
		return nil, fmt.Errorf("consume power states: %w", err)
	}
	context.AfterFunc(ctx, cc.Stop)
	return f, nil
}

func (f *powerFollower) handle(m jetstream.Msg) {
	_, vm, event, ok := subject.ParseEvent(m.Subject())
	if ok && event == "domain-shutdown" {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		if err := f.s.followPower(ctx, vm, false); err != nil {
			f.s.log.Error("volumes did not follow the power state", "qube", vm, "event", event, "err", err)
		}
		cancel()
	}
	_ = m.Ack()
}

// settle waits (briefly) until every stored power event is handled, so a call right
// after a shutdown sees the revision it committed.
func (f *powerFollower) settle(ctx context.Context) {
	if f == nil {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	tick := time.NewTicker(2 * time.Millisecond)
	defer tick.Stop()
	for {
		info, err := f.cons.Info(ctx)
		if err != nil || (info.NumPending == 0 && info.NumAckPending == 0) {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// followPower starts or stops every volume of a qube.
func (s *Service) followPower(ctx context.Context, name string, start bool) error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	q, err := s.qubeVolumes(name)
	if err != nil {
		return err
	}
	var errs []error
	for _, v := range q.vols {
		p, err := s.poolOf(q.pools, v)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		v = effective(p, v)
		if start {
			err = p.Start(ctx, v, s.source(q.pools, v))
		} else {
			err = p.Stop(ctx, v)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", v.Name, err))
		}
	}
	return errors.Join(errs...)
}
