package vmlifecycle

import (
	"context"
	"encoding/json"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
	"github.com/nats-io/nuid"

	"github.com/qubesbus/qubesbus/bus/cloudevent"
	"github.com/qubesbus/qubesbus/bus/rpc"
	"github.com/qubesbus/qubesbus/schemas/lifecycle"
)

// admin.vm.Stats on the bus. The stream itself is relayed by the gateway; this service
// produces the samples:
//
//  1. The gateway subscribes (core NATS) to StatsStream.Subject, then sends the
//     admin.vm.Stats call as any other. The pre-handler checks run here; an exception
//     is answered as usual. On success the OK content is a JSON StatsStream (not wire
//     content) and the call has opened a lease named StatsStream.Lease.
//  2. The gateway writes connection-established and then relays every vm-stats
//     CloudEvent from Subject whose subject (the qube) matches the call's destination
//     (all of them for dom0).
//  3. While the client stays, the gateway renews the lease on LeaseSubject with a
//     StatsLeaseRequest at least every LeaseMS/3; when the client goes it sends one with
//     Stop. A lease that is not renewed expires after LeaseMS.
//
// While at least one lease is open the service publishes, every stats_interval
// seconds (and at once when the first lease opens), one vm-stats event per active
// domain of a known qube (dom0 included), with qubesd's kwargs in its order. The
// samples are not stored in JetStream: admin.Events subscribers never see them.

// The admin.vm.Stats stream's messages.
type (
	StatsStream       = lifecycle.StatsStream
	StatsLeaseRequest = lifecycle.StatsLeaseRequest
	StatsLeaseReply   = lifecycle.StatsLeaseReply
)

type statsProducer struct {
	s   *Service
	ttl time.Duration

	mu     sync.Mutex
	leases map[string]time.Time // lease → expiry
	last   map[string]cpuSample
	kick   chan struct{}
}

type cpuSample struct {
	xid int
	cpu time.Duration
	at  time.Time
}

func newStatsProducer(s *Service, ttl time.Duration) *statsProducer {
	return &statsProducer{s: s, ttl: ttl, leases: map[string]time.Time{}, last: map[string]cpuSample{},
		kick: make(chan struct{}, 1)}
}

func (p *statsProducer) subject() string {
	return p.s.host.Service(lifecycle.ServiceToken, lifecycle.SubjectStats)
}

// renew opens or extends a lease; the first open lease triggers a sample at once.
func (p *statsProducer) renew(lease string) {
	p.mu.Lock()
	p.prune(time.Now())
	first := len(p.leases) == 0
	p.leases[lease] = time.Now().Add(p.ttl)
	p.mu.Unlock()
	if first {
		select {
		case p.kick <- struct{}{}:
		default:
		}
	}
}

func (p *statsProducer) prune(now time.Time) {
	for id, exp := range p.leases {
		if now.After(exp) {
			delete(p.leases, id)
		}
	}
}

func (p *statsProducer) vmStats(_ context.Context, c *rpc.Call) ([]byte, error) {
	lease := c.ID
	if lease == "" {
		lease = nuid.Next()
	}
	p.renew(lease)
	return json.Marshal(StatsStream{
		Subject:      p.subject(),
		LeaseSubject: p.s.host.Service(lifecycle.ServiceToken, lifecycle.OpStatsLease),
		Lease:        lease,
		LeaseMS:      p.ttl.Milliseconds(),
		IntervalMS:   p.interval().Milliseconds(),
		Dest:         c.Dest.Name,
		DestAdminVM:  c.Dest.IsAdminVM(),
	})
}

func (p *statsProducer) serveLease(r micro.Request) {
	var req StatsLeaseRequest
	if err := json.Unmarshal(r.Data(), &req); err != nil || req.Lease == "" {
		_ = r.RespondJSON(StatsLeaseReply{Error: "bad lease request"})
		return
	}
	if req.Stop {
		p.mu.Lock()
		delete(p.leases, req.Lease)
		p.mu.Unlock()
		_ = r.RespondJSON(StatsLeaseReply{})
		return
	}
	p.renew(req.Lease)
	_ = r.RespondJSON(StatsLeaseReply{LeaseMS: p.ttl.Milliseconds()})
}

// interval is stats_interval; qubesd accepts 0 or negative values (and then spins),
// here they mean one second.
func (p *statsProducer) interval() time.Duration {
	d := p.s.inv.StatsInterval()
	if d <= 0 {
		d = time.Second
	}
	return d
}

func (p *statsProducer) run(ctx context.Context, nc *nats.Conn) {
	for {
		t := time.NewTimer(p.interval())
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-p.kick:
			t.Stop()
		case <-t.C:
		}
		p.mu.Lock()
		p.prune(time.Now())
		active := len(p.leases) > 0
		p.mu.Unlock()
		if active {
			p.publish(ctx, nc)
		}
	}
}

// publish sends one sample per active domain of a known qube.
func (p *statsProducer) publish(ctx context.Context, nc *nats.Conn) {
	doms, err := p.s.drv.Domains(ctx)
	if err != nil {
		p.s.log.Warn("stats: read domains", "err", err)
		return
	}
	sort.Slice(doms, func(i, j int) bool { return doms[i].XID < doms[j].XID })
	now := time.Now()
	p.mu.Lock()
	seen := map[string]bool{}
	var evs []cloudevent.Event
	for _, d := range doms {
		if _, ok := p.s.inv.Qube(d.Name); !ok {
			continue
		}
		seen[d.Name] = true
		usage := 0
		if prev, ok := p.last[d.Name]; ok && prev.xid == d.XID && now.After(prev.at) && d.VCPUs > 0 {
			usage = int(100 * float64(d.CPUTime-prev.cpu) / float64(now.Sub(prev.at)) / float64(d.VCPUs))
			usage = max(0, min(100, usage))
		}
		p.last[d.Name] = cpuSample{xid: d.XID, cpu: d.CPUTime, at: now}
		mem := strconv.FormatInt(d.MemoryKiB, 10)
		evs = append(evs, cloudevent.New(d.Name, "vm-stats",
			"memory_kb", mem,
			"memory_assigned_total", mem,
			"memory_assigned_usable", mem,
			"memory_with_swap_used", mem,
			"cpu_time", strconv.FormatInt(d.CPUTime.Milliseconds(), 10),
			"cpu_usage", strconv.Itoa(usage),
			"online_vcpus", strconv.Itoa(d.VCPUs)))
	}
	for name := range p.last {
		if !seen[name] {
			delete(p.last, name)
		}
	}
	p.mu.Unlock()
	for _, e := range evs {
		msg, err := cloudevent.Encode(ctx, p.s.host.ID(), e)
		if err != nil {
			p.s.log.Warn("stats: encode", "err", err)
			continue
		}
		msg.Subject = p.subject()
		if err := nc.PublishMsg(msg); err != nil {
			p.s.log.Warn("stats: publish", "err", err)
			return
		}
	}
}
