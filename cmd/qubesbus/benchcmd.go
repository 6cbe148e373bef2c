package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"time"

	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/bench"
)

func ints(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil {
			return nil, fmt.Errorf("%q: %w", s, err)
		}
		out = append(out, n)
	}
	return out, nil
}

// benchCmd runs the load tool and prints one table per run.
func benchCmd(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var cfg bench.Config
	var clients, scales, subs, classes string
	fs.StringVar(&cfg.Seed, "qubes-xml", "testdata/qubes.xml", "seed qubes.xml")
	fs.DurationVar(&cfg.Duration, "duration", 3*time.Second, "per class and concurrency")
	fs.StringVar(&clients, "clients", "1,32", "concurrent clients")
	fs.StringVar(&scales, "qubes", "0,1000", "extra qubes per run (the seed has 9)")
	fs.StringVar(&subs, "subscribers", "1,10,100", "admin.Events fan-out")
	fs.StringVar(&classes, "classes", "", "comma-separated call classes (default all)")
	cpuprofile := fs.String("cpuprofile", "", "write a CPU profile of the whole run (services included: they run in this process)")
	profileDir := fs.String("profile-dir", "", "write CPU, mutex and block profiles of each class measurement alone (<class>-<qubes>q-<clients>c.{cpu,mutex,block,allocs,allocs-base}.prof; pprof -diff_base the allocs-base) into this directory")
	fs.BoolVar(&cfg.SkipQvmLs, "skip-qvm-ls", false, "do not run the qvm-ls-shaped workload")
	fs.IntVar(&cfg.FloorClients, "floor-clients", 8, "concurrent property.Get clients in the comparison with the recorded floor")
	fs.IntVar(&cfg.Rounds, "rounds", 3, "rounds of the comparison with the recorded floor (each measures floor and qubesbus back to back)")
	fs.BoolVar(&cfg.ReadsOnly, "reads-only", false, "only compare property.Get and the qvm-ls shape with the recorded floor (no other class, floor or fan-out)")
	fs.BoolVar(&cfg.InProcessReaders, "inprocess-readers", false, "read the admin.Events subscribers in this process, not in a child process as a dom0 listener runs")
	serveFloor := fs.String("serve-floor", "", "serve the recorded floor alone on this socket until SIGTERM/SIGINT, measuring nothing: the answers --floor-from gives to property.Get of work's label and to the qvm-ls shape, from a table (for tools/pybench.py)")
	floorFrom := fs.String("floor-from", envOr("QUBESBUS_SOCKET", "run/qubesd.sock"), "with --serve-floor: the running qubesbus socket whose answers it records (QUBESBUS_SOCKET)")
	if code, stop := parseFlags(fs, args, "bench [--qubes 0,1000] [--clients 1,32] [flags]", stdout); stop {
		return code
	}
	if *serveFloor != "" {
		log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
		ready := func(calls int) { fmt.Fprintf(stderr, "floor ready: %d recorded calls on %s\n", calls, *serveFloor) }
		if err := bench.ServeRecordedFloor(ctx, *serveFloor, *floorFrom, ready, log); err != nil {
			fmt.Fprintln(stderr, "qubesbus bench:", err)
			return 1
		}
		return 0
	}
	var err error
	if cfg.Clients, err = ints(clients); err == nil {
		if cfg.Scales, err = ints(scales); err == nil {
			cfg.Subscribers, err = ints(subs)
		}
	}
	if err != nil {
		fmt.Fprintln(stderr, "qubesbus bench:", err)
		return 2
	}
	if classes != "" {
		cfg.Classes = strings.Split(classes, ",")
	}
	dir, err := os.MkdirTemp("", "qubesbus-bench")
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	cfg.Dir = dir
	if *cpuprofile != "" {
		f, err := os.Create(*cpuprofile)
		if err != nil {
			fmt.Fprintln(stderr, err)
			return 1
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			fmt.Fprintln(stderr, err)
			return 1
		}
		defer pprof.StopCPUProfile()
	}
	if *profileDir != "" {
		if err := os.MkdirAll(*profileDir, 0o755); err != nil {
			fmt.Fprintln(stderr, err)
			return 1
		}
		if *cpuprofile != "" {
			fmt.Fprintln(stderr, "qubesbus bench: --cpuprofile and --profile-dir exclude each other")
			return 2
		}
		cfg.Measure = func(name string) func() { return profileMeasurement(filepath.Join(*profileDir, name), stderr) }
	}
	rep, err := bench.Suite(ctx, cfg, slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	if ctx.Err() != nil { // the measurements were cut short: no report
		fmt.Fprintln(stderr, "qubesbus bench: interrupted:", context.Cause(ctx))
		return 1
	}
	if err != nil {
		fmt.Fprintln(stderr, "qubesbus bench:", err)
		return 1
	}
	host, _ := os.Hostname()
	fmt.Fprintf(stdout, "machine: %s, %d CPUs, %s/%s, %s; %s per measurement\n\n", host, runtime.NumCPU(), runtime.GOOS, runtime.GOARCH, runtime.Version(), cfg.Duration)
	bench.Print(stdout, rep, cfg)
	return 0
}

// profileMeasurement profiles one measurement: CPU, and contention on mutexes and
// blocking (every event while it runs; both are off before and after). It returns what
// writes the profiles to prefix.{cpu,mutex,block}.prof; failures are reported, not fatal.
func profileMeasurement(prefix string, stderr io.Writer) (done func()) {
	cpu, err := os.Create(prefix + ".cpu.prof")
	if err == nil {
		if err = pprof.StartCPUProfile(cpu); err != nil {
			cpu.Close()
			cpu = nil
		}
	}
	if err != nil {
		fmt.Fprintln(stderr, "qubesbus bench: cpu profile:", err)
	}
	runtime.SetMutexProfileFraction(1)
	runtime.SetBlockProfileRate(1)
	write := func(kind, suffix string) {
		if f, err := os.Create(prefix + suffix); err == nil {
			_ = pprof.Lookup(kind).WriteTo(f, 0)
			f.Close()
		}
	}
	// The allocations profile counts from the process's start, as of the last GC: the
	// one taken before is the base to subtract (pprof -diff_base).
	runtime.GC()
	write("allocs", ".allocs-base.prof")
	return func() {
		if cpu != nil {
			pprof.StopCPUProfile()
			cpu.Close()
		}
		runtime.GC()
		write("allocs", ".allocs.prof")
		for _, kind := range []string{"mutex", "block"} {
			write(kind, "."+kind+".prof")
		}
		runtime.SetMutexProfileFraction(0)
		runtime.SetBlockProfileRate(0)
	}
}
