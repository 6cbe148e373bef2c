package hvbus

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	natsserver "github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"

	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/services/vmlifecycle"
	"github.com/qubesbus/qubesbus/services/vmlifecycle/simdriver"
)

// probe is the simulated hypervisor with its WaitAgent calls counted, so tests see
// whether the server side of a call is still waiting.
type probe struct {
	*simdriver.Hypervisor
	waiting atomic.Int32 // WaitAgent calls in progress
	waits   atomic.Int32 // WaitAgent calls so far
}

func (p *probe) WaitAgent(ctx context.Context, name string, xid int) error {
	p.waits.Add(1)
	p.waiting.Add(1)
	defer p.waiting.Add(-1)
	return p.Hypervisor.WaitAgent(ctx, name, xid)
}

type rig struct {
	ns     *natsserver.Server
	drv    *probe
	js     jetstream.JetStream // the client's
	host   subject.Host
	client Client
}

// newRig serves a simulated hypervisor on its own connection, as its own process
// would, and returns a client on another one. The host id needs escaping both in
// subjects and in consumer names.
func newRig(t testing.TB, cfg simdriver.Config) *rig {
	t.Helper()
	ns := bustest.RunJetStream(t)
	host := subject.ForHost("lab.host/1")
	srvNC := bustest.Connect(t, ns)
	srvJS, err := jetstream.New(srvNC)
	if err != nil {
		t.Fatal(err)
	}
	if err := EnsureNoticeStream(t.Context(), srvJS, 1); err != nil {
		t.Fatal(err)
	}
	drv := &probe{Hypervisor: simdriver.New(cfg)}
	svc, err := serveHV(t, t.Context(), srvNC, host, drv)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = svc.Stop() })
	r := &rig{ns: ns, drv: drv, host: host}
	r.client, r.js = r.newClient(t, "")
	return r
}

// newClient connects another lifecycle instance.
func (r *rig) newClient(t testing.TB, consumer string) (Client, jetstream.JetStream) {
	t.Helper()
	nc := bustest.Connect(t, r.ns)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return Client{NC: nc, JS: js, Host: r.host, Consumer: consumer}, js
}

// start creates and unpauses a domain through the client.
func start(t testing.TB, c Client, name string, qrexec bool) vmlifecycle.Domain {
	t.Helper()
	ctx := t.Context()
	d, err := c.Create(ctx, vmlifecycle.DomainSpec{Name: name, MemoryMiB: 400, MaxMemMiB: 4000, VCPUs: 2, VirtMode: "pvh", Qrexec: qrexec})
	if err != nil {
		t.Fatalf("create %s: %v", name, err)
	}
	if err := c.Unpause(ctx, name); err != nil {
		t.Fatalf("unpause %s: %v", name, err)
	}
	return d
}

func recv(t testing.TB, ch <-chan vmlifecycle.Notice, within time.Duration) vmlifecycle.Notice {
	t.Helper()
	select {
	case n, ok := <-ch:
		if !ok {
			t.Fatal("notice channel closed")
		}
		return n
	case <-time.After(within):
		t.Fatalf("no notice within %s", within)
	}
	panic("unreachable")
}

// consumerSettled reports nil once the consumer has nothing pending nor unacked.
func consumerSettled(ctx context.Context, js jetstream.JetStream, name string) error {
	cons, err := js.Consumer(ctx, NoticeStream, name)
	if err != nil {
		return err
	}
	info, err := cons.Info(ctx)
	if err != nil {
		return err
	}
	if info.NumPending != 0 || info.NumAckPending != 0 {
		return fmt.Errorf("consumer %s: %d pending, %d unacked", name, info.NumPending, info.NumAckPending)
	}
	return nil
}

func TestStartAndStopThroughClient(t *testing.T) {
	r := newRig(t, simdriver.Config{MemoryMiB: 2000, ShutdownLatency: 50 * time.Millisecond})
	c, ctx := r.client, t.Context()
	notices, err := c.Watch(ctx)
	if err != nil {
		t.Fatal(err)
	}

	if err := c.ReserveMemory(ctx, "work", 400); err != nil {
		t.Fatal(err)
	}
	d, err := c.Create(ctx, vmlifecycle.DomainSpec{Name: "work", MemoryMiB: 400, MaxMemMiB: 4000, VCPUs: 2, VirtMode: "hvm", Qrexec: true})
	if err != nil {
		t.Fatal(err)
	}
	if d.Name != "work" || d.XID <= 0 || d.StubdomXID <= d.XID || d.State != vmlifecycle.HVPaused || d.VCPUs != 2 {
		t.Fatalf("created %+v", d)
	}
	if err := c.Unpause(ctx, "work"); err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := c.WaitAgent(wctx, "work", d.XID); err != nil {
		t.Fatal(err)
	}

	doms, err := c.Domains(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(doms) != 2 || doms[0].XID != 0 || doms[1].Name != "work" || doms[1].XID != d.XID ||
		doms[1].State != vmlifecycle.HVRunning || !doms[1].AgentConnected || !doms[1].StartTime.Equal(d.StartTime) {
		t.Fatalf("domains %+v", doms)
	}
	got, ok, err := c.Domain(ctx, "work")
	if err != nil || !ok || got.XID != d.XID || got.State != vmlifecycle.HVRunning {
		t.Fatalf("domain work: %+v %v %v", got, ok, err)
	}
	if _, ok, err := c.Domain(ctx, "ghost"); ok || err != nil {
		t.Fatalf("domain ghost: %v %v", ok, err)
	}

	if err := c.Shutdown(ctx, "work"); err != nil {
		t.Fatal(err)
	}
	n := recv(t, notices, 10*time.Second)
	if want := (vmlifecycle.Notice{Kind: vmlifecycle.NoticeStopped, Name: "work", XID: d.XID}); n != want {
		t.Fatalf("notice %+v, want %+v", n, want)
	}
	if _, ok, err := c.Domain(ctx, "work"); ok || err != nil {
		t.Fatalf("domain work after stop: %v %v", ok, err)
	}
}

func TestErrorsKeepTheirSentinels(t *testing.T) {
	r := newRig(t, simdriver.Config{MemoryMiB: 2000})
	c, ctx := r.client, t.Context()
	running := start(t, c, "running", false)
	start(t, c, "nosuspend", false)
	r.drv.SetFaults("nosuspend", simdriver.Faults{SuspendUnsupported: true})
	start(t, c, "stopped", false)
	if err := c.Destroy(ctx, "stopped"); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name     string
		call     func() error
		wantErr  error  // nil: matches none of the sentinels
		wantCode string // of the *Error
		wantText string
	}{
		{"destroy a stopped domain", func() error { return c.Destroy(ctx, "stopped") }, vmlifecycle.ErrNoDomain, CodeNoDomain, "stopped"},
		{"unpause an unknown domain", func() error { return c.Unpause(ctx, "ghost") }, vmlifecycle.ErrNoDomain, CodeNoDomain, "ghost"},
		{"wait for an old instance", func() error { return c.WaitAgent(ctx, "running", running.XID+100) }, vmlifecycle.ErrNoDomain, CodeNoDomain, "running"},
		{"reserve beyond the host", func() error { return c.ReserveMemory(ctx, "huge", 1<<20) }, vmlifecycle.ErrNotEnoughMemory, CodeNotEnoughMemory, "MiB free"},
		{"suspend an unwilling guest", func() error { return c.Suspend(ctx, "nosuspend") }, vmlifecycle.ErrUnsupported, CodeUnsupported, "nosuspend"},
		{"create an existing domain", func() error {
			_, err := c.Create(ctx, vmlifecycle.DomainSpec{Name: "running", MemoryMiB: 400})
			return err
		}, nil, CodeFailed, "already exists"},
		{"wake a running domain", func() error { return c.Wakeup(ctx, "running") }, nil, CodeFailed, "running"},
	}
	sentinelErrs := []error{vmlifecycle.ErrNoDomain, vmlifecycle.ErrNotEnoughMemory, vmlifecycle.ErrUnsupported}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.call()
			if err == nil {
				t.Fatal("no error")
			}
			for _, s := range sentinelErrs {
				if errors.Is(err, s) != (s == tt.wantErr) {
					t.Errorf("errors.Is(%v, %v) = %v", err, s, !(s == tt.wantErr))
				}
			}
			var herr *Error
			if !errors.As(err, &herr) || herr.Code != tt.wantCode {
				t.Errorf("error %v: code %v, want %s", err, herr, tt.wantCode)
			}
			if !strings.Contains(err.Error(), tt.wantText) {
				t.Errorf("error %q does not say %q", err, tt.wantText)
			}
		})
	}
}

func TestWaitAgentEndsWithCallersContext(t *testing.T) {
	r := newRig(t, simdriver.Config{})
	c := r.client
	r.drv.SetFaults("mute", simdriver.Faults{AgentNeverConnects: true})
	d := start(t, c, "mute", true)
	quiet := start(t, c, "quiet", false) // no agent to wait for

	for _, tt := range []struct {
		name    string
		ctx     func() (context.Context, context.CancelFunc)
		cancel  bool // cancel (or expire) once the server waits
		wantErr error
	}{
		{"cancelled", func() (context.Context, context.CancelFunc) { return context.WithCancel(t.Context()) }, true, context.Canceled},
		// The deadline passes once the server waits, not after a time a busy machine
		// could spend before the call even arrives.
		{"deadline", func() (context.Context, context.CancelFunc) {
			c := &expiring{deadline: time.Now().Add(time.Minute), done: make(chan struct{})}
			return c, c.expire
		}, true, context.DeadlineExceeded},
	} {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := tt.ctx()
			defer cancel()
			errc := make(chan error, 1)
			go func() { errc <- c.WaitAgent(ctx, "mute", d.XID) }()
			bustest.CheckFor(t, 5*time.Second, 10*time.Millisecond, func() error {
				if n := r.drv.waiting.Load(); n != 1 {
					return fmt.Errorf("%d server-side waits", n)
				}
				return nil
			})
			if tt.cancel {
				cancel()
			}
			select {
			case err := <-errc:
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("wait agent: %v, want %v", err, tt.wantErr)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("wait agent did not return with its context")
			}
			// Far sooner than a wait round (30 s): the server's wait ended with the caller.
			bustest.CheckFor(t, 10*time.Second, 10*time.Millisecond, func() error {
				if n := r.drv.waiting.Load(); n != 0 {
					return fmt.Errorf("%d server-side waits left", n)
				}
				return nil
			})
			wctx, wcancel := context.WithTimeout(t.Context(), 10*time.Second)
			defer wcancel()
			if err := c.WaitAgent(wctx, "quiet", quiet.XID); err != nil {
				t.Fatalf("next call: %v", err)
			}
		})
	}
}

// expiring is a context with a deadline whose passing the test decides: it reports
// the deadline, and ends with context.DeadlineExceeded when expire is called.
type expiring struct {
	deadline time.Time
	done     chan struct{}
	once     sync.Once
}

func (c *expiring) Deadline() (time.Time, bool) { return c.deadline, true }
func (c *expiring) Done() <-chan struct{}       { return c.done }
func (c *expiring) Value(any) any               { return nil }
func (c *expiring) Err() error {
	select {
	case <-c.done:
		return context.DeadlineExceeded
	default:
		return nil
	}
}
func (c *expiring) expire() { c.once.Do(func() { close(c.done) }) }

// The server ends a call when the caller's budget runs out, even if no cancel comes.
func TestServerHonoursCallerBudget(t *testing.T) {
	r := newRig(t, simdriver.Config{})
	r.drv.SetFaults("mute", simdriver.Faults{AgentNeverConnects: true})
	d := start(t, r.client, "mute", true)
	msg := nats.NewMsg(r.host.Hypervisor(OpWaitAgent))
	msg.Header.Set(headerTimeout, "200")
	msg.Data = fmt.Appendf(nil, `{"name":"mute","xid":%d}`, d.XID)
	began := time.Now()
	rep, err := r.client.NC.RequestMsg(msg, DefaultTimeout/2) // a server that ignored the budget would wait DefaultTimeout
	if err != nil {
		t.Fatal(err)
	}
	if code := rep.Header.Get(micro.ErrorCodeHeader); code != CodeTimeout {
		t.Fatalf("code %q (%s), want %s", code, rep.Data, CodeTimeout)
	}
	if took := time.Since(began); took < 200*time.Millisecond {
		t.Fatalf("answered after %s, budget 200ms", took)
	}

	msg = nats.NewMsg(r.host.Hypervisor(OpWaitAgent))
	msg.Header.Set(headerTimeout, "soon")
	if rep, err = r.client.NC.RequestMsg(msg, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if code := rep.Header.Get(micro.ErrorCodeHeader); code != CodeBadRequest {
		t.Fatalf("bad timeout: code %q, want %s", code, CodeBadRequest)
	}
}

// A WaitAgent longer than a round is carried on in further rounds.
func TestWaitAgentOverSeveralRounds(t *testing.T) {
	r := newRig(t, simdriver.Config{BootLatency: 700 * time.Millisecond})
	c := r.client
	c.waitRound = 100 * time.Millisecond
	d := start(t, c, "slow", true)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if err := c.WaitAgent(ctx, "slow", d.XID); err != nil {
		t.Fatal(err)
	}
	if n := r.drv.waits.Load(); n < 3 {
		t.Fatalf("%d server-side waits for a 700ms boot in 100ms rounds", n)
	}
}

func TestNoticesSurviveWatcherGap(t *testing.T) {
	r := newRig(t, simdriver.Config{})
	c, ctx := r.client, t.Context()
	c.Consumer = "gap"
	names := []string{"a", "b", "c"}
	xids := map[string]int{}
	for _, name := range names {
		xids[name] = start(t, c, name, false).XID
	}

	wctx, cancel := context.WithCancel(ctx)
	notices, err := c.Watch(wctx)
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	for range notices {
		t.Fatal("notice before any stop")
	}
	// Nobody watches now.
	for _, name := range names {
		if err := c.Destroy(ctx, name); err != nil {
			t.Fatal(err)
		}
	}
	bustest.CheckFor(t, 5*time.Second, 20*time.Millisecond, func() error {
		info, err := r.js.Stream(ctx, NoticeStream)
		if err != nil || info.CachedInfo().State.Msgs < uint64(len(names)) {
			return fmt.Errorf("stops not stored yet: %v", err)
		}
		return nil
	})
	notices, err = c.Watch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range names {
		n := recv(t, notices, 3*ackWait)
		if n.Kind != vmlifecycle.NoticeStopped || n.Name != name || n.XID != xids[name] || !n.Backlog {
			t.Fatalf("notice %+v, want %s (xid %d) stopped, from the backlog", n, name, xids[name])
		}
	}
	// A stop while watching is live, not backlog.
	live := start(t, c, "d", false)
	if err := c.Destroy(ctx, "d"); err != nil {
		t.Fatal(err)
	}
	if n := recv(t, notices, 3*ackWait); n.Name != "d" || n.XID != live.XID || n.Backlog {
		t.Fatalf("live notice %+v", n)
	}
	// Each was acked once received.
	bustest.CheckFor(t, 5*time.Second, 20*time.Millisecond, func() error { return consumerSettled(ctx, r.js, "gap") })
}

// A notice a watcher holds but nobody received from it goes to the next watcher as
// soon as that one is cancelled, not after the ack wait.
func TestUnreceivedNoticeGoesToNextWatcher(t *testing.T) {
	r := newRig(t, simdriver.Config{})
	c, ctx := r.client, t.Context()
	d := start(t, c, "a", false)
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if _, err := c.Watch(wctx); err != nil {
		t.Fatal(err)
	}
	if err := c.Destroy(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	name := "vmlifecycle-" + consumerToken(r.host.ID())
	bustest.CheckFor(t, 5*time.Second, 10*time.Millisecond, func() error {
		cons, err := r.js.Consumer(ctx, NoticeStream, name)
		if err != nil {
			return err
		}
		if info, err := cons.Info(ctx); err != nil || info.NumAckPending != 1 {
			return fmt.Errorf("first watcher does not hold the notice: %v %v", info, err)
		}
		return nil
	})
	cancel()
	began := time.Now()
	n := recv(t, mustWatch(t, c), 3*ackWait)
	if n.Name != "a" || n.XID != d.XID {
		t.Fatalf("notice %+v", n)
	}
	if took := time.Since(began); took >= ackWait {
		t.Fatalf("handed over after %s, not at once", took)
	}
}

func mustWatch(t testing.TB, c Client) <-chan vmlifecycle.Notice {
	t.Helper()
	ch, err := c.Watch(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	return ch
}

// Two watchers on one consumer split the notices; none gets one the other got.
func TestSharedConsumerDeliversEachNoticeOnce(t *testing.T) {
	r := newRig(t, simdriver.Config{MemoryMiB: 8000})
	ctx := t.Context()
	c1, _ := r.newClient(t, "shared")
	c2, _ := r.newClient(t, "shared")
	var mu sync.Mutex
	got := map[int]int{} // xid → deliveries
	for _, c := range []Client{c1, c2} {
		ch := mustWatch(t, c)
		go func() {
			for n := range ch {
				mu.Lock()
				got[n.XID]++
				mu.Unlock()
			}
		}()
	}
	var xids []int
	for i := range 8 {
		name := fmt.Sprintf("q%d", i)
		xids = append(xids, start(t, r.client, name, false).XID)
		if err := r.client.Destroy(ctx, name); err != nil {
			t.Fatal(err)
		}
	}
	bustest.CheckFor(t, 20*time.Second, 20*time.Millisecond, func() error {
		mu.Lock()
		defer mu.Unlock()
		if len(got) != len(xids) {
			return fmt.Errorf("%d of %d notices", len(got), len(xids))
		}
		return consumerSettled(ctx, r.js, "shared")
	})
	mu.Lock()
	defer mu.Unlock()
	for _, xid := range xids {
		if got[xid] != 1 {
			t.Errorf("xid %d delivered %d times", xid, got[xid])
		}
	}
}

func TestEnsureNoticeStream(t *testing.T) {
	ns := bustest.RunJetStream(t)
	js, err := jetstream.New(bustest.Connect(t, ns))
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	for range 2 { // idempotent
		if err := EnsureNoticeStream(ctx, js, 1); err != nil {
			t.Fatal(err)
		}
	}
	st, err := js.Stream(ctx, NoticeStream)
	if err != nil {
		t.Fatal(err)
	}
	cfg := st.CachedInfo().Config
	if cfg.Storage != jetstream.FileStorage || cfg.MaxAge != 24*time.Hour || cfg.Discard != jetstream.DiscardOld ||
		len(cfg.Subjects) != 1 || cfg.Subjects[0] != subject.AllHypervisorNotices() {
		t.Fatalf("stream config %+v", cfg)
	}
	// Tuned by an operator: left alone.
	cfg.MaxAge = time.Hour
	if _, err := js.UpdateStream(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	if err := EnsureNoticeStream(ctx, js, 1); err != nil {
		t.Fatalf("tuned stream: %v", err)
	}
	if st, err = js.Stream(ctx, NoticeStream); err != nil || st.CachedInfo().Config.MaxAge != time.Hour {
		t.Fatalf("tuned stream changed: %v", err)
	}
	// Not taking the notices: refused.
	if err := js.DeleteStream(ctx, NoticeStream); err != nil {
		t.Fatal(err)
	}
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: NoticeStream, Subjects: []string{"elsewhere.>"}}); err != nil {
		t.Fatal(err)
	}
	if err := EnsureNoticeStream(ctx, js, 1); !errors.Is(err, ErrStreamConflict) {
		t.Fatalf("stream on other subjects: %v", err)
	}
}

func TestConsumerNames(t *testing.T) {
	for _, tt := range []struct{ in, want string }{
		{"local", "local"},
		{"lab%2Ehost/1", "lab_252Ehost_2F1"},
		{"a_b", "a_5Fb"}, // the escape byte is escaped, so distinct ids stay distinct
		{"a b*>\\", "a_20b_2A_3E_5C"},
	} {
		got := consumerToken(tt.in)
		if got != tt.want {
			t.Errorf("consumerToken(%q) = %q, want %q", tt.in, got, tt.want)
		}
		if err := validConsumerName(got); err != nil {
			t.Errorf("consumerToken(%q) = %q: %v", tt.in, got, err)
		}
	}
	c := Client{Host: subject.ForHost("h"), Consumer: "bad.name"}
	if _, err := c.Watch(t.Context()); err == nil {
		t.Fatal("watch with consumer bad.name")
	}
}

func BenchmarkDomainsOverNATS(b *testing.B) {
	r := newRig(b, simdriver.Config{MemoryMiB: 20 * 400})
	for i := range 20 {
		start(b, r.client, fmt.Sprintf("q%02d", i), false)
	}
	ctx := b.Context()
	b.ReportAllocs()
	for b.Loop() {
		doms, err := r.client.Domains(ctx)
		if err != nil {
			b.Fatal(err)
		}
		if len(doms) != 21 {
			b.Fatalf("%d domains", len(doms))
		}
	}
}

// Once a later lease term has called, the earlier term's changes are refused, while
// its reads still work: a deposed leader that has not noticed yet cannot drive domains
// beside its successor.
func TestEarlierTermIsFenced(t *testing.T) {
	r := newRig(t, simdriver.Config{})
	ctx := t.Context()
	old, next, none := r.client, r.client, r.client
	deposed := 0
	old.Epoch, next.Epoch, old.OnFenced = 7, 9, func() { deposed++ }
	start(t, old, "a", false)
	if _, err := next.Domains(ctx); err != nil { // the successor reads the domains back
		t.Fatal(err)
	}
	if err := old.Pause(ctx, "a"); !errors.Is(err, ErrFenced) || deposed != 1 {
		t.Fatalf("pause from the earlier term: %v (told %d times), want ErrFenced, told once", err, deposed)
	}
	if _, ok, err := old.Domain(ctx, "a"); err != nil || !ok {
		t.Fatalf("read from the earlier term: %v %v", ok, err)
	}
	if err := next.Pause(ctx, "a"); err != nil {
		t.Fatalf("pause from the current term: %v", err)
	}
	if err := none.Unpause(ctx, "a"); err != nil { // without elections nothing is fenced
		t.Fatalf("unpause without a term: %v", err)
	}
}

// A hypervisor whose connection is moving to another node has no subscription for a
// moment: calls made then wait for it rather than fail (nobody received them, so even
// a change is safe to send again).
func TestCallsWaitForTheHypervisorToBeReachable(t *testing.T) {
	r := newRig(t, simdriver.Config{})
	ctx := t.Context()
	// A second hypervisor service for another host comes up late.
	late := subject.ForHost("late")
	c := r.client
	c.Host = late
	done := make(chan error, 1)
	sent := c.NC.Stats().OutMsgs
	go func() {
		_, err := c.Create(ctx, vmlifecycle.DomainSpec{Name: "a", MemoryMiB: 400, MaxMemMiB: 4000, VCPUs: 1, VirtMode: "pvh"})
		done <- err
	}()
	// A second send shows the call found nobody and waits. (A subscriber watching
	// for it would be a responder.)
	bustest.CheckFor(t, 10*time.Second, time.Millisecond, func() error {
		if n := c.NC.Stats().OutMsgs - sent; n < 2 {
			return fmt.Errorf("call sent %d times", n)
		}
		return nil
	})
	select {
	case err := <-done:
		t.Fatalf("call ended with no hypervisor: %v", err)
	default:
	}
	nc := bustest.Connect(t, r.ns)
	svc, err := serveHV(t, ctx, nc, late, simdriver.New(simdriver.Config{}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = svc.Stop() })
	if err := <-done; err != nil {
		t.Fatalf("call once the hypervisor was reachable: %v", err)
	}
	if _, ok, err := c.Domain(ctx, "a"); err != nil || !ok {
		t.Fatalf("created domain not there: %v %v", ok, err)
	}
}

// serveHV serves drv as host's hypervisor on nc.
func serveHV(t testing.TB, ctx context.Context, nc *nats.Conn, host subject.Host, drv vmlifecycle.Driver) (micro.Service, error) {
	t.Helper()
	srv, err := New(Config{Host: host, Driver: drv})
	if err != nil {
		t.Fatal(err)
	}
	return srv.Serve(ctx, nc)
}

// TestConsoleThroughClient: the console's terminal path crosses the bus; a qube with
// no domain gets ErrNoDomain, which the lifecycle turns into qubesd's error.
func TestConsoleThroughClient(t *testing.T) {
	r := newRig(t, simdriver.Config{})
	ctx := t.Context()
	if _, err := r.client.Console(ctx, "a"); !errors.Is(err, vmlifecycle.ErrNoDomain) {
		t.Fatalf("console of no domain: %v", err)
	}
	start(t, r.client, "a", false)
	path, err := r.client.Console(ctx, "a")
	if err != nil || !strings.HasPrefix(path, "/dev/pts/") {
		t.Fatalf("console: %q %v", path, err)
	}
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("terminal %s: %v", path, err)
	}
}
