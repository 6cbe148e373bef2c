package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime"
	"runtime/pprof"
	"strings"
	"time"

	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/lab"
)

// labCmd runs N simulated hosts with M extra qubes each on one NATS (embedded, or a
// cluster given by --nats-url, comma-separated URLs spread hosts over the servers).
func labCmd(ctx context.Context, args []string, stdout, stderr io.Writer, log *slog.Logger) int {
	fs := flag.NewFlagSet("lab", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var c lab.Config
	var urls string
	fs.IntVar(&c.Hosts, "hosts", 3, "number of hosts")
	fs.IntVar(&c.Qubes, "qubes", 10, "extra AppVMs per host (scale-0001 …)")
	fs.StringVar(&c.Seed, "qubes-xml", envOr("QUBESBUS_QUBES_XML", "testdata/qubes.xml"), "qubes.xml every host starts from")
	fs.StringVar(&c.Dir, "dir", "run/lab", "one folder per host (socket and data)")
	fs.StringVar(&urls, "nats-url", envOr("QUBESBUS_NATS_URL", ""), "NATS URLs, comma-separated; empty runs an embedded server")
	fs.IntVar(&c.NATSPort, "nats-port", 4222, "embedded NATS port")
	fs.IntVar(&c.Replicas, "replicas", 1, "JetStream replicas (3 on a cluster)")
	fs.IntVar(&c.Parallel, "parallel", 0, "hosts started at once (0: 4 per CPU)")
	memprofile := fs.String("memprofile", "", "write a heap profile here once every host is ready")
	httpAddr := httpFlag(fs)
	natsHTTPFlag(fs, &c.NATSHTTP)
	if code, stop := parseFlags(fs, args, "lab --hosts N --qubes M [--nats-url URLS] [flags]", stdout); stop {
		return code
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	reg, ready, wait, err := startOps(ctx, *httpAddr, log)
	if err != nil {
		fmt.Fprintln(stderr, "qubesbus lab:", err)
		return 1
	}
	defer wait()
	c.Metrics = registerer(reg)
	if urls != "" {
		c.URLs = strings.Split(urls, ",")
	}
	began := time.Now()
	l, err := lab.Start(ctx, c, log)
	if err != nil {
		if ctx.Err() != nil { // a signal during start-up: what had started is stopped
			log.Info("stopped during start-up", "cause", context.Cause(ctx), "err", err)
			return 0
		}
		fmt.Fprintln(stderr, "qubesbus lab:", err)
		return 1
	}
	ready.set(l.Ready)
	// One view of every host: any host's connection reaches the whole bus.
	ready.startWeb(ctx, ready.serving, l.Hosts[0].ConnectAs, log)
	for _, h := range l.Hosts {
		fmt.Fprintf(stdout, "%s %s\n", h.ID, h.Socket)
	}
	log.Info("lab ready", "hosts", len(l.Hosts), "qubes_per_host", c.Qubes, "took", time.Since(began).Round(time.Millisecond))
	if *memprofile != "" {
		if err := writeHeapProfile(*memprofile); err != nil {
			fmt.Fprintln(stderr, "qubesbus lab:", err)
		}
	}
	<-ctx.Done()
	if err := l.Stop(); err != nil {
		fmt.Fprintln(stderr, "qubesbus lab:", err)
		return 1
	}
	return 0
}

// writeHeapProfile writes the live heap (after a collection) to path.
func writeHeapProfile(path string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	runtime.GC()
	if err := pprof.Lookup("heap").WriteTo(f, 0); err != nil {
		f.Close()
		return fmt.Errorf("heap profile: %w", err)
	}
	return f.Close()
}
