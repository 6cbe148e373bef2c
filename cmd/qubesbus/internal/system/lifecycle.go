package system

import (
	"context"
	"encoding/hex"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/lease"
	"github.com/qubesbus/qubesbus/bus/rpc"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/schemas/devicectl"
	"github.com/qubesbus/qubesbus/schemas/replica"
	storageapi "github.com/qubesbus/qubesbus/schemas/storage"
	"github.com/qubesbus/qubesbus/services/vmlifecycle"
	"github.com/qubesbus/qubesbus/services/vmlifecycle/hvbus"
)

// termGrace is how long calls in flight may go on after a lifecycle term ends.
const termGrace = time.Second

// leaseKey is the lease of a host's lifecycle service: KV keys allow fewer characters
// than subject tokens, so an unusual host id is hex-encoded.
func leaseKey(host subject.Host) string {
	id := host.ID()
	ok := id != ""
	for _, c := range id {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			ok = false
		}
	}
	if !ok {
		id = "x" + hex.EncodeToString([]byte(id))
	}
	return string(rpc.VMLifecycle) + "." + id
}

// startLifecycle runs the host's lifecycle service whenever this instance holds the
// host's lease: one instance drives the hypervisor at a time, the others stand by and
// take over when the holder dies (its lease expires) or stops (it releases it). Each
// term runs a fresh service, which reads the running domains back from the hypervisor
// and catches up on its notices, with the term's epoch on its runtime marks.
//
// Unless cfg.Standby (one of several instances), it returns once the first term serves.
func (s *System) startLifecycle(nc *nats.Conn, host subject.Host, cfg Config, log *slog.Logger) (micro.Service, error) {
	ctx := s.ctx
	// Every term serves over the same replica.
	rep, err := replica.Follow(ctx, nc, host, log)
	if err != nil {
		return nil, err
	}
	s.replica = rep // the services started after this one share it
	s.obs.addReplica(string(rpc.VMLifecycle), rep, nc)
	events, err := s.eventsPublisher(nc, host)
	if err != nil {
		return nil, err
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, fmt.Errorf("jetstream: %w", err)
	}
	// ensureStreams (or `qubesbus setup`, where services run as their own users) has
	// created the bucket.
	kv, err := js.KeyValue(ctx, lease.Bucket)
	if err != nil {
		return nil, fmt.Errorf("lease bucket %s (run qubesbus setup): %w", lease.Bucket, err)
	}
	// Renewals must follow the bucket's TTL, whoever created it.
	ttl := cfg.LeaseTTL
	if st, err := kv.Status(ctx); err == nil && st.TTL() > 0 {
		ttl = st.TTL()
	}
	holder, _ := os.Hostname()
	holder = strings.ReplaceAll(fmt.Sprintf("%s-%d", holder, os.Getpid()), " ", "_")
	l := lease.New(kv, leaseKey(host), holder, ttl, log)
	s.obs.lease.Store(&leaseView{kv: kv, key: leaseKey(host)})
	serving := make(chan struct{})
	s.done.Add(1)
	go func() {
		defer s.done.Done()
		first := true
		for ctx.Err() == nil {
			term, err := l.Acquire(ctx)
			if err != nil {
				return
			}
			// A term ends when the lease is lost, or when the hypervisor refuses this
			// term's changes because a later one has called it.
			tctx, deposed := context.WithCancel(term.Context())
			drv := hvbus.Client{NC: nc, JS: js, Host: host, Epoch: term.Epoch, OnFenced: deposed}
			life, err := vmlifecycle.New(vmlifecycle.Config{
				Host: host, Replica: rep, Driver: drv, Log: log, Auth: s.policy, Epoch: term.Epoch,
				Volumes: storageapi.Client{NC: nc, Host: host}, Events: events,
				Devices: devicectl.Client{NC: nc, Host: host},
			})
			s.obs.epoch.Store(term.Epoch)
			if err == nil {
				// Calls in flight when the term ends may finish (reads waiting for the
				// replica, say); new ones go to the next holder at once.
				sctx, stopService := context.WithCancel(context.WithoutCancel(ctx))
				var m interface{ Stop() error }
				if m, err = life.Serve(sctx, nc); err == nil {
					if first {
						close(serving)
						first = false
					}
					<-tctx.Done()
					_ = m.Stop()
					_ = bus.Sleep(ctx, termGrace)
				}
				stopService()
			}
			deposed()
			s.obs.epoch.Store(0)
			if err != nil {
				log.Error("lifecycle term failed", "epoch", term.Epoch, "err", err)
			}
			// Give the lease up at once on the way out, so a standby need not wait for
			// it to expire.
			rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			if rerr := term.Release(rctx); rerr != nil {
				log.Warn("release lifecycle lease", "err", rerr)
			}
			cancel()
			if err != nil {
				_ = bus.Sleep(ctx, time.Second) // do not spin on a failing start
			}
		}
	}()
	if !cfg.Standby {
		select {
		case <-serving:
		case <-time.After(2*ttl + 10*time.Second):
			return nil, fmt.Errorf("lifecycle service: no lease after %s", 2*ttl+10*time.Second)
		case <-ctx.Done(): // the system stopped, or its start-up was interrupted
			return nil, fmt.Errorf("lifecycle service: no lease yet: %w", ctx.Err())
		}
	}
	return nil, nil
}
