package bench

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/cloudevent"
	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/access"
	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/lab"
	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/system"
	"github.com/qubesbus/qubesbus/schemas/qubesxml"
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
	// FloorClients are the concurrent clients of property.Get in the comparison with
	// the recorded floor (readsVsFloor); Rounds how often each pair is measured.
	FloorClients, Rounds int
	// ReadsOnly runs the comparison of reads with the recorded floor and nothing else.
	ReadsOnly bool
	// InProcessReaders reads the admin.Events subscribers from this process instead
	// of a child process (which is how a dom0 listener runs).
	InProcessReaders bool
	// Measure, if set, is called before each class measurement with its name
	// ("feature.Set-1009q-8c") and the function it returns after it: profiles of
	// the calls alone, without start-up and floors.
	Measure func(name string) (done func())
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
	Reads   []ReadsResult // per scale: property.Get and the qvm-ls shape against the recorded floor
}

// EventResult is publish-to-socket latency at a fan-out.
type EventResult struct {
	Subscribers int
	Events      int
	P50, P99    time.Duration
	InProcess   bool // read by this process, not a child
	By          Publisher
	// Stalls counts the pauses between events that overran by more than 1 ms: the
	// machine (or this process) did not run the bench when due. A few are enough to
	// decide p99, since each stalled event counts once per subscriber.
	Stalls int
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
	if cfg.FloorClients <= 0 {
		cfg.FloorClients = 8
	}
	if cfg.Rounds <= 0 {
		cfg.Rounds = 3
	}
	rep := &Report{Classes: map[int][]Result{}}
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
		reads, err := readsVsFloor(ctx, cfg, sys.Socket, dir, scale, log)
		if err != nil {
			sys.Stop()
			return nil, fmt.Errorf("reads against the recorded floor, %d extra qubes: %w", scale, err)
		}
		rep.Reads = append(rep.Reads, reads)
		if cfg.ReadsOnly {
			if err := sys.Stop(); err != nil {
				log.Warn("stop", "err", err)
			}
			continue
		}
		if si == 0 {
			if err := floors(ctx, cfg, sys, dir, rep); err != nil {
				sys.Stop()
				return nil, err
			}
			rep.Events, err = eventFanOut(ctx, cfg, sys, dir)
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
				done := func() {}
				if cfg.Measure != nil {
					done = cfg.Measure(fmt.Sprintf("%s-%dq-%dc", class, 9+scale, n))
				}
				r := Run(ctx, class, n, cfg.Duration, op)
				done()
				rep.Classes[scale] = append(rep.Classes[scale], r)
			}
		}
		if err := ctx.Err(); err != nil { // interrupted: stop, do not start the next
			sys.Stop()
			return nil, err
		}
		if err := sys.Stop(); err != nil {
			log.Warn("stop", "err", err)
		}
	}
	return rep, nil
}

func floors(ctx context.Context, cfg Config, sys *system.System, dir string, rep *Report) error {
	nc, err := sys.ConnectAs(ctx, access.Admin, "bench-client")
	if err != nil {
		return err
	}
	defer nc.Close()
	rc, err := sys.ConnectAs(ctx, access.Admin, "bench-responder")
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

// eventFanOut publishes events stamped with their send time and measures when each
// subscriber's socket delivers them. The subscribers are read by a child process, as
// a dom0 listener would be (Config.InProcessReaders: by a thread of this process).
//
// Events go out one at a time, each after the previous one's publish was acknowledged
// and a 2 ms pause: a steady rate, so the figures are delivery latency, not the time a
// burst spends queued.
func eventFanOut(ctx context.Context, cfg Config, sys *system.System, dir string) ([]EventResult, error) {
	nc, err := sys.ConnectAs(ctx, access.Admin, "bench-events") // it publishes the events it measures
	if err != nil {
		return nil, err
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	// As a service of the gateway's process sends (qvm-features and the rest, under
	// `qubesbus run`), and as a service of another process does.
	tapped, err := sys.EventsPublisher(nc)
	if err != nil {
		return nil, err
	}
	floor, err := startEventsFloor(dir)
	if err != nil {
		return nil, err
	}
	defer floor.close()
	publishers := []struct {
		by     Publisher
		pub    eventPublisher
		socket string
	}{
		{ByFloor, floor, floor.socket},
		{ByTap, tapped, sys.Socket},
		{ByConnection, cloudevent.NewPublisher(js, "bench"), sys.Socket},
	}
	inProcess := cfg.InProcessReaders || os.Getenv(InProcessReadersEnv) != ""
	var out []EventResult
	for _, subs := range cfg.Subscribers {
		for _, p := range publishers {
			r, err := fanOutOnce(ctx, p.socket, p.pub, subs, inProcess)
			floor.disconnect()
			if err != nil {
				return nil, err
			}
			r.By = p.by
			out = append(out, r)
		}
	}
	return out, nil
}

// Publisher says who published the events of a fan-out measurement.
type Publisher int

const (
	// ByFloor: the bare fan-out of eventsFloor, no qubesbus.
	ByFloor Publisher = iota
	// ByTap: a publisher as the services of the gateway's process have, which the
	// gateway hears through its tap before NATS.
	ByTap
	// ByConnection: a publisher on a connection of its own, as a service of another
	// process (`qubesbus serve`), which the gateway hears from NATS.
	ByConnection
)

func (p Publisher) String() string {
	switch p {
	case ByFloor:
		return "floor: a bare socket server's fan-out"
	case ByTap:
		return "a service of the gateway's process"
	default:
		return "a service of another process"
	}
}

// eventPublisher stores events (cloudevent.Publisher).
type eventPublisher interface {
	Publish(ctx context.Context, events ...cloudevent.Event) error
}

// fanOutOnce publishes 500 events, 2 ms apart, to subs subscribers: enough that p99
// at 100 subscribers is not one slow event (each counts once per subscriber).
func fanOutOnce(ctx context.Context, socket string, pub eventPublisher, subs int, inProcess bool) (EventResult, error) {
	const events = 500
	collect, err := startReading(ctx, socket, subs, events, inProcess)
	if err != nil {
		return EventResult{}, err
	}
	stalls := 0
	for i := 0; i < events; i++ {
		ev := cloudevent.New("work", benchEvent, "feature", "bench", "value", strconv.FormatInt(time.Now().UnixNano(), 10))
		if err := pub.Publish(ctx, ev); err != nil {
			collect()
			return EventResult{}, err
		}
		t := time.Now()
		if err := bus.Sleep(ctx, 2*time.Millisecond); err != nil {
			collect()
			return EventResult{}, err
		}
		if time.Since(t) > 3*time.Millisecond {
			stalls++
		}
	}
	lats, err := collect()
	if err != nil {
		return EventResult{}, err
	}
	slices.Sort(lats)
	return EventResult{Subscribers: subs, Events: len(lats), P50: Percentile(lats, 50), P99: Percentile(lats, 99), InProcess: inProcess, Stalls: stalls}, nil
}

// Print writes the report as markdown tables.
func Print(w io.Writer, rep *Report, cfg Config) {
	floor := map[int]time.Duration{}
	floorRate := map[int]float64{}
	if cfg.ReadsOnly {
		printReads(w, rep)
		return
	}
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
	fmt.Fprintln(w, "| admin.Events subscribers | published by | read by | events received (all subscribers) | publish→socket p50 | p99 | publisher pauses >1 ms late |")
	fmt.Fprintln(w, "|---|---|---|---|---|---|---|")
	for _, e := range rep.Events {
		by := "child process"
		if e.InProcess {
			by = "bench process"
		}
		fmt.Fprintf(w, "| %d | %s | %s | %d | %s | %s | %d |\n", e.Subscribers, e.By, by, e.Events, e.P50.Round(time.Microsecond), e.P99.Round(time.Microsecond), e.Stalls)
	}
	fmt.Fprintln(w)
	printReads(w, rep)
}

// printReads writes the comparison of reads with the recorded floor.
func printReads(w io.Writer, rep *Report) {
	fmt.Fprintln(w, "| qubes | reads against the recorded floor | floor | qubesbus | qubesbus ÷ floor, time (median of rounds) | qubesbus ÷ floor, process CPU |")
	fmt.Fprintln(w, "|---|---|---|---|---|---|")
	for _, r := range rep.Reads {
		fmt.Fprintf(w, "| %d | property.Get, %d clients, calls/s (best of %d) | %.0f | %.0f | %.2f | %.2f |\n", r.Qubes, r.Clients, r.Rounds, r.GetFloor.PerSecond, r.Get.PerSecond, r.GetRatio, r.GetCPURatio)
		if r.QvmLs > 0 {
			fmt.Fprintf(w, "| %d | qvm-ls shape (List + GetAll each, one client), median | %s | %s | %.2f | %.2f |\n", r.Qubes, r.QvmLsFloor.Round(100*time.Microsecond), r.QvmLs.Round(100*time.Microsecond), r.QvmLsRatio, r.QvmLsCPURatio)
			fmt.Fprintf(w, "| %d | the same right after a change (no kept reply), median | | %s | %.2f | %.2f |\n", r.Qubes, r.QvmLsCold.Round(100*time.Microsecond), r.QvmLsColdRatio, r.QvmLsColdCPURatio)
		}
	}
}
