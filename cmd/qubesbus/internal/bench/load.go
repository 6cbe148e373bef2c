// Package bench measures qubesbus the way a user would compare it: calls per second
// and latency per call class over the real socket, against the floor of a bare NATS
// request-reply and a bare Unix-socket round trip on the same machine.
package bench

import (
	"context"
	"fmt"
	"io"
	"net"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Result of one class at one concurrency.
type Result struct {
	Class      string
	Clients    int
	Calls      int
	Errors     int
	PerSecond  float64
	P50, P99   time.Duration
	AllocsCall float64 // heap allocations per call, whole process (in-process system)
	// CPUCall is the process's CPU time (user and system) per call: clients, gateway,
	// services and NATS together. Unlike calls/s it hardly moves with what else the
	// machine runs.
	CPUCall time.Duration
}

// processCPU is the CPU time this process has used.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// Op makes one call; client is the caller's index, i its call count.
type Op func(ctx context.Context, client, i int) error

// Run calls op from clients goroutines for d and measures each call.
func Run(ctx context.Context, class string, clients int, d time.Duration, op Op) Result {
	var ms0, ms1 runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms0)
	lat := make([][]time.Duration, clients)
	var errs atomic.Int64
	stop := time.Now().Add(d)
	var wg sync.WaitGroup
	cpu0 := processCPU()
	start := time.Now()
	for c := 0; c < clients; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; time.Now().Before(stop) && ctx.Err() == nil; i++ {
				t := time.Now()
				if err := op(ctx, c, i); err != nil {
					errs.Add(1)
					continue
				}
				lat[c] = append(lat[c], time.Since(t))
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	cpu := processCPU() - cpu0
	runtime.ReadMemStats(&ms1)
	var all []time.Duration
	for _, l := range lat {
		all = append(all, l...)
	}
	slices.Sort(all)
	r := Result{Class: class, Clients: clients, Calls: len(all), Errors: int(errs.Load())}
	if n := len(all); n > 0 {
		r.PerSecond = float64(n) / elapsed.Seconds()
		r.P50, r.P99 = all[n/2], all[min(n-1, n*99/100)]
		r.AllocsCall = float64(ms1.Mallocs-ms0.Mallocs) / float64(n)
		r.CPUCall = cpu / time.Duration(n)
	}
	return r
}

// Call sends one request over a Unix socket the way qubesadmin does (write, half-close,
// read to EOF) and returns the response.
func Call(socket string, req []byte) ([]byte, error) {
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: socket, Net: "unix"})
	if err != nil {
		return nil, err
	}
	defer c.Close()
	if _, err := c.Write(req); err != nil {
		return nil, err
	}
	if err := c.CloseWrite(); err != nil {
		return nil, err
	}
	return io.ReadAll(c)
}

// SocketOp is an Op that sends req and requires an OK response.
func SocketOp(socket string, req func(client, i int) []byte) Op {
	return func(_ context.Context, client, i int) error {
		b, err := Call(socket, req(client, i))
		if err != nil {
			return err
		}
		if len(b) < 2 || b[0] != '0' || b[1] != 0 {
			return fmt.Errorf("not ok: %.60q", b)
		}
		return nil
	}
}

// Percentile of sorted durations.
func Percentile(sorted []time.Duration, p int) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	return sorted[min(len(sorted)-1, len(sorted)*p/100)]
}
