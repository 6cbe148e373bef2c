package gateway

import (
	"context"
	"encoding/json"
	"log/slog"
	"net"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/qubesbus/qubesbus/bus/cloudevent"
	"github.com/qubesbus/qubesbus/bus/envelope"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/schemas/lifecycle"
)

// Stats serves admin.vm.Stats: samples are not history, so they travel on core NATS
// while a lease is held, never through the events stream.
type Stats struct {
	nc   *nats.Conn
	host subject.Host
	log  *slog.Logger
	// WriteTimeout cuts off a client that stops reading.
	WriteTimeout time.Duration
}

// NewStats returns the admin.vm.Stats handler.
func NewStats(nc *nats.Conn, host subject.Host, log *slog.Logger) *Stats {
	return &Stats{nc: nc, host: host, log: log, WriteTimeout: 10 * time.Second}
}

// Serve is the StreamHandler of admin.vm.Stats. The subscription exists before the
// call, so the first sample (sent as the lease opens) is not missed; the lease is
// renewed while the client stays and released when it goes (cancellation).
func (s *Stats) Serve(ctx context.Context, c *net.UnixConn, req *envelope.Request, relay func(*envelope.Request) (envelope.Reply, error)) {
	samples := make(chan *nats.Msg, 1024)
	sub, err := s.nc.ChanSubscribe(s.host.Service(lifecycle.ServiceToken, lifecycle.SubjectStats), samples)
	if err != nil {
		s.log.Error("admin.vm.Stats subscribe", "id", req.ID, "err", err)
		return
	}
	defer sub.Unsubscribe()
	// The server must have the subscription before the call; a gateway stopping
	// meanwhile ends the wait.
	fctx, fcancel := context.WithTimeout(ctx, 10*time.Second)
	err = s.nc.FlushWithContext(fctx)
	fcancel()
	if err != nil {
		s.log.Error("admin.vm.Stats flush", "id", req.ID, "err", err)
		return
	}
	rep, err := relay(req)
	if err != nil {
		s.log.Error("admin.vm.Stats call", "id", req.ID, "err", err)
		return
	}
	if rep.Status != envelope.StatusOK {
		writeReply(c, rep, s.log)
		return
	}
	var st lifecycle.StatsStream
	if err := json.Unmarshal(rep.Content, &st); err != nil || st.Lease == "" || st.LeaseMS <= 0 {
		s.log.Error("admin.vm.Stats: bad stream description", "id", req.ID, "err", err)
		return
	}
	defer func() {
		// The client is gone: release the lease, and announce the cancellation of the
		// call on its cancel subject as for every cancellable call.
		b, _ := json.Marshal(lifecycle.StatsLeaseRequest{Lease: st.Lease, Stop: true})
		_ = s.nc.Publish(st.LeaseSubject, b)
		_ = s.nc.Publish(s.host.Cancel(req.ID), nil)
	}()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go watchHangup(ctx, c, cancel)
	w := &Events{cfg: EventsConfig{WriteTimeout: s.WriteTimeout}, log: s.log}
	if !w.write(c, connectionEstablished) {
		return
	}
	renew := time.NewTicker(time.Duration(st.LeaseMS) * time.Millisecond / 3)
	defer renew.Stop()
	lease, _ := json.Marshal(lifecycle.StatsLeaseRequest{Lease: st.Lease})
	for {
		select {
		case <-ctx.Done():
			return
		case <-renew.C:
			_ = s.nc.Publish(st.LeaseSubject, lease)
		case msg := <-samples:
			ev, err := cloudevent.DecodeHeaders(msg)
			if err != nil || ev.Name != "vm-stats" {
				continue
			}
			if !st.DestAdminVM && ev.VM != st.Dest {
				continue
			}
			if !w.write(c, appendCloudEvent(nil, ev)) {
				return
			}
		}
	}
}
