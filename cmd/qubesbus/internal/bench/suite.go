package bench

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/cloudevent"
	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/lab"
	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/system"
	"github.com/qubesbus/qubesbus/services/persistence/qubesxml"
)

// Config of a benchmark run.
type Config struct {
	Seed        string        // qubes.xml the hosts start from
	Dir         string        // scratch space
	Duration    time.Duration // per class and concurrency
	Clients     []int         // e.g. 1, 32
	Scales      []int         // extra qubes per host, e.g. 0, 1000, 10000
	Subscribers []int         // admin.Events fan-out, e.g. 1, 10, 100
	Classes     []string      // empty: all
	SkipQvmLs   bool
}

// Classes in table order.
var Classes = []string{"admin.vm.List", "property.Get", "property.GetAll", "property.Set", "feature.Set", "Start+Shutdown"}

func classOp(class, socket string, qubes int) Op {
	reqs := map[string]func(c, i int) []byte{
		"admin.vm.List":   func(int, int) []byte { return []byte("admin.vm.List+ dom0 name dom0\x00") },
		"property.Get":    func(int, int) []byte { return []byte("admin.vm.property.Get+label dom0 name work\x00") },
		"property.GetAll": func(int, int) []byte { return []byte("admin.vm.property.GetAll+ dom0 name work\x00") },
		"property.Set": func(c, i int) []byte {
			return []byte(fmt.Sprintf("admin.vm.property.Set+memory dom0 name work\x00%d", 400+i%2*100))
		},
		"feature.Set": func(c, i int) []byte {
			return []byte(fmt.Sprintf("admin.vm.feature.Set+bench.c%d dom0 name work\x00%d", c, i))
		},
	}
	if r, ok := reqs[class]; ok {
		return SocketOp(socket, r)
	}
	if class == "Start+Shutdown" {
		// Each client powers its own qube on and off (needs generated qubes).
		return func(ctx context.Context, c, i int) error {
			if c >= qubes {
				return fmt.Errorf("no qube for client %d", c)
			}
			vm := fmt.Sprintf("scale-%04d", c+1)
			for _, req := range []string{"admin.vm.Start+ dom0 name " + vm + "\x00", "admin.vm.Shutdown+force+wait dom0 name " + vm + "\x00"} {
				if err := SocketOp(socket, func(int, int) []byte { return []byte(req) })(ctx, c, i); err != nil {
					return err
				}
			}
			return nil
		}
	}
	return nil
}

// Report is everything one run measured.
type Report struct {
	Floors  []Result // "floor: NATS", "floor: socket" per clients
	Classes map[int][]Result
	Events  []EventResult
	QvmLs   map[int]time.Duration // qubes → wall time of List + GetAll each
}

// EventResult is publish-to-socket latency at a fan-out.
type EventResult struct {
	Subscribers int
	Events      int
	P50, P99    time.Duration
}

// Suite runs everything and returns the report.
func Suite(ctx context.Context, cfg Config, log *slog.Logger) (*Report, error) {
	seed, err := qubesxml.Load(cfg.Seed)
	if err != nil {
		return nil, err
	}
	// Every scale must fit before any is measured.
	for _, scale := range cfg.Scales {
		if _, err := lab.Generate(seed, "bench", scale); err != nil {
			return nil, fmt.Errorf("%d extra qubes: %w", scale, err)
		}
	}
	rep := &Report{Classes: map[int][]Result{}, QvmLs: map[int]time.Duration{}}
	for si, scale := range cfg.Scales {
		dir := filepath.Join(cfg.Dir, fmt.Sprintf("scale-%d", scale))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, err
		}
		conf, err := lab.Generate(seed, "bench", scale)
		if err != nil {
			return nil, err
		}
		seedFile := filepath.Join(dir, "seed.xml")
		if err := qubesxml.Save(seedFile, conf); err != nil {
			return nil, err
		}
		sys, err := system.Start(ctx, system.Config{Socket: filepath.Join(dir, "qubesd.sock"), DataDir: filepath.Join(dir, "data"),
			QubesXML: seedFile, HostID: "bench", NATSPort: -1}, log)
		if err != nil {
			return nil, err
		}
		if si == 0 {
			if err := floors(ctx, cfg, sys, dir, rep); err != nil {
				sys.Stop()
				return nil, err
			}
			rep.Events, err = eventFanOut(ctx, cfg, sys)
			if err != nil {
				sys.Stop()
				return nil, err
			}
		}
		for _, class := range Classes {
			if len(cfg.Classes) > 0 && !slices.Contains(cfg.Classes, class) {
				continue
			}
			for _, n := range cfg.Clients {
				op := classOp(class, sys.Socket, scale)
				if class == "Start+Shutdown" && n > scale {
					continue
				}
				rep.Classes[scale] = append(rep.Classes[scale], Run(ctx, class, n, cfg.Duration, op))
			}
		}
		if !cfg.SkipQvmLs {
			rep.QvmLs[scale] = qvmLs(sys.Socket)
		}
		if err := sys.Stop(); err != nil {
			log.Warn("stop", "err", err)
		}
	}
	return rep, nil
}

func floors(ctx context.Context, cfg Config, sys *system.System, dir string, rep *Report) error {
	nc, err := bus.Connect(ctx, bus.ConnConfig{URL: sys.NATSURL, InProcess: sys.NATS, Name: "bench-client"}, slog.New(slog.DiscardHandler))
	if err != nil {
		return err
	}
	defer nc.Close()
	rc, err := bus.Connect(ctx, bus.ConnConfig{URL: sys.NATSURL, InProcess: sys.NATS, Name: "bench-responder"}, slog.New(slog.DiscardHandler))
	if err != nil {
		return err
	}
	defer rc.Close()
	natsOp, stopN, err := NATSFloor(nc, rc)
	if err != nil {
		return err
	}
	defer stopN()
	sockOp, stopS, err := SocketFloor(dir)
	if err != nil {
		return err
	}
	defer stopS()
	for _, n := range cfg.Clients {
		rep.Floors = append(rep.Floors, Run(ctx, "floor: NATS request-reply", n, cfg.Duration, natsOp))
		rep.Floors = append(rep.Floors, Run(ctx, "floor: socket round trip", n, cfg.Duration, sockOp))
	}
	return nil
}

// qvmLs is the qvm-ls-shaped workload: the list, then GetAll of every qube, in turn.
func qvmLs(socket string) time.Duration {
	start := time.Now()
	b, err := Call(socket, []byte("admin.vm.List+ dom0 name dom0\x00"))
	if err != nil || len(b) < 2 {
		return -1
	}
	for _, line := range strings.Split(strings.TrimSuffix(string(b[2:]), "\n"), "\n") {
		name, _, _ := strings.Cut(line, " ")
		if r, err := Call(socket, []byte("admin.vm.property.GetAll+ dom0 name "+name+"\x00")); err != nil || len(r) < 2 || r[0] != '0' {
			return -1
		}
	}
	return time.Since(start)
}

// eventFanOut publishes events stamped with their send time and measures when each
// subscriber's socket delivers them.
func eventFanOut(ctx context.Context, cfg Config, sys *system.System) ([]EventResult, error) {
	nc, err := bus.Connect(ctx, bus.ConnConfig{URL: sys.NATSURL, InProcess: sys.NATS, Name: "bench-events"}, slog.New(slog.DiscardHandler))
	if err != nil {
		return nil, err
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	pub := cloudevent.NewPublisher(js, "bench")
	var out []EventResult
	for _, subs := range cfg.Subscribers {
		const events = 200
		var mu sync.Mutex
		var lats []time.Duration
		var wg sync.WaitGroup
		conns := make([]net.Conn, 0, subs)
		for s := 0; s < subs; s++ {
			c, err := net.Dial("unix", sys.Socket)
			if err != nil {
				return nil, err
			}
			conns = append(conns, c)
			c.Write([]byte("admin.Events+ dom0 name dom0\x00"))
			c.(*net.UnixConn).CloseWrite()
			r := bufio.NewReader(c)
			if _, err := readFrame(r); err != nil { // connection-established
				return nil, err
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				for got := 0; got < events; {
					f, err := readFrame(r)
					if err != nil {
						return
					}
					if len(f) >= 6 && f[1] == "domain-feature-set:bench" {
						ns, _ := strconv.ParseInt(f[5], 10, 64)
						mu.Lock()
						lats = append(lats, time.Since(time.Unix(0, ns)))
						mu.Unlock()
						got++
					}
				}
			}()
		}
		for i := 0; i < events; i++ {
			ev := cloudevent.New("work", "domain-feature-set:bench", "feature", "bench", "value", strconv.FormatInt(time.Now().UnixNano(), 10))
			if err := pub.Publish(ctx, ev); err != nil {
				return nil, err
			}
			time.Sleep(2 * time.Millisecond) // a steady rate, not one burst
		}
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
		}
		for _, c := range conns {
			c.Close()
		}
		slices.Sort(lats)
		out = append(out, EventResult{Subscribers: subs, Events: len(lats), P50: Percentile(lats, 50), P99: Percentile(lats, 99)})
	}
	return out, nil
}

// readFrame reads one event frame's fields.
func readFrame(r *bufio.Reader) ([]string, error) {
	head, err := r.ReadString(0)
	if err != nil || head != "1\x00" {
		return nil, fmt.Errorf("bad frame %q: %v", head, err)
	}
	var f []string
	for {
		s, err := r.ReadString(0)
		if err != nil {
			return nil, err
		}
		s = s[:len(s)-1]
		if len(f) >= 2 && len(f)%2 == 0 && s == "" {
			return f, nil
		}
		f = append(f, s)
	}
}

// Print writes the report as markdown tables.
func Print(w io.Writer, rep *Report, cfg Config) {
	floor := map[int]time.Duration{}
	floorRate := map[int]float64{}
	fmt.Fprintln(w, "| qubes | call | clients | calls/s | p50 | p99 | allocs/call | p50 ÷ floor |")
	fmt.Fprintln(w, "|---|---|---|---|---|---|---|---|")
	for _, r := range rep.Floors {
		floor[r.Clients] += r.P50
		floorRate[r.Clients] = r.PerSecond
		fmt.Fprintf(w, "| – | %s | %d | %.0f | %s | %s | %.1f | |\n", r.Class, r.Clients, r.PerSecond, r.P50.Round(time.Microsecond), r.P99.Round(time.Microsecond), r.AllocsCall)
	}
	for _, scale := range cfg.Scales {
		for _, r := range rep.Classes[scale] {
			ratio := "n/a"
			if f := floor[r.Clients]; f > 0 && r.Calls > 0 {
				ratio = fmt.Sprintf("%.2f", float64(r.P50)/float64(f))
			}
			errs := ""
			if r.Errors > 0 {
				errs = fmt.Sprintf(" (%d errors)", r.Errors)
			}
			fmt.Fprintf(w, "| %d | %s%s | %d | %.0f | %s | %s | %.1f | %s |\n", 9+scale, r.Class, errs, r.Clients, r.PerSecond, r.P50.Round(time.Microsecond), r.P99.Round(time.Microsecond), r.AllocsCall, ratio)
		}
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| admin.Events subscribers | events received (all subscribers) | publish→socket p50 | p99 |")
	fmt.Fprintln(w, "|---|---|---|---|")
	for _, e := range rep.Events {
		fmt.Fprintf(w, "| %d | %d | %s | %s |\n", e.Subscribers, e.Events, e.P50.Round(time.Microsecond), e.P99.Round(time.Microsecond))
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| qubes | qvm-ls shape (List + GetAll each, one client) |")
	fmt.Fprintln(w, "|---|---|")
	for _, scale := range cfg.Scales {
		d := rep.QvmLs[scale]
		s := d.Round(time.Millisecond).String()
		if d < 0 {
			s = "failed"
		}
		fmt.Fprintf(w, "| %d | %s |\n", 9+scale, s)
	}
}
