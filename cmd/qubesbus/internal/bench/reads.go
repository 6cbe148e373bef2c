package bench

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/qubesbus/qubesbus/services/gateway"
)

// ReadsResult compares the reads of one scale with the recorded floor: the gateway's
// own socket handling answering the same bytes from a table (gateway.Recording), in
// the same process and the same run, so the ratio is what the bus and the services
// cost a client.
type ReadsResult struct {
	Qubes   int
	Clients int // of property.Get
	Rounds  int
	// Get and GetFloor are property.Get's best-of-rounds runs; GetRatio is the median
	// over rounds of floor calls/s ÷ qubesbus calls/s (qubesbus's time per call ÷ the
	// floor's).
	Get, GetFloor Result
	GetRatio      float64
	// QvmLs and QvmLsFloor are the median wall times of the qvm-ls shape (List, then
	// GetAll of each qube, one client); QvmLsRatio the median of each round's ratio.
	QvmLs, QvmLsFloor time.Duration
	QvmLsRatio        float64
	// GetCPURatio and QvmLsCPURatio are the medians of each round's ratio of process
	// CPU time per call (or per run): what qubesbus costs, whatever else the machine
	// runs meanwhile.
	GetCPURatio, QvmLsCPURatio float64
	// QvmLsCold is the median wall time of the qvm-ls shape right after a change (a
	// feature of dom0, which no reply of it shows), so that no reply kept from before
	// serves it; QvmLsColdRatio and QvmLsColdCPURatio compare it with the floor's run
	// beside it, the two in alternating order after each change.
	QvmLsCold                         time.Duration
	QvmLsColdRatio, QvmLsColdCPURatio float64
}

// getRequest is the property.Get the reads comparison measures.
const getRequest = "admin.vm.property.Get+label dom0 name work\x00"

// readsVsFloor records the answers qubesbus gives to the read workloads, serves them
// from a table on a socket of its own, then measures floor and qubesbus back to back,
// alternating which goes first in each round.
func readsVsFloor(ctx context.Context, cfg Config, socket, dir string, qubes int, log *slog.Logger) (ReadsResult, error) {
	res := ReadsResult{Qubes: 9 + qubes, Clients: cfg.FloorClients, Rounds: cfg.Rounds}
	rec, err := RecordReads(socket, !cfg.SkipQvmLs)
	if err != nil {
		return res, err
	}
	floorSock := filepath.Join(dir, "recorded.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: floorSock, Net: "unix"})
	if err != nil {
		return res, err
	}
	fctx, stop := context.WithCancel(ctx)
	floor := gateway.ServeRecording(fctx, l, rec, log)
	defer func() {
		stop()
		floor.Wait()
	}()

	get := SocketOp(socket, func(int, int) []byte { return []byte(getRequest) })
	getFloor := SocketOp(floorSock, func(int, int) []byte { return []byte(getRequest) })
	var getRatios, lsRatios, getCPU, lsCPU, coldRatios, coldCPU []float64
	var ls, lsFloor, cold []time.Duration
	for round := 0; round < cfg.Rounds && ctx.Err() == nil; round++ {
		var g, f Result
		if round%2 == 0 {
			f = Run(ctx, "property.Get (recorded floor)", cfg.FloorClients, cfg.Duration, getFloor)
			g = Run(ctx, "property.Get", cfg.FloorClients, cfg.Duration, get)
		} else {
			g = Run(ctx, "property.Get", cfg.FloorClients, cfg.Duration, get)
			f = Run(ctx, "property.Get (recorded floor)", cfg.FloorClients, cfg.Duration, getFloor)
		}
		if g.Errors > 0 || f.Errors > 0 || g.Calls == 0 || f.Calls == 0 {
			return res, fmt.Errorf("property.Get: %d and %d errors (qubesbus, floor)", g.Errors, f.Errors)
		}
		getRatios = append(getRatios, f.PerSecond/g.PerSecond)
		getCPU = append(getCPU, float64(g.CPUCall)/float64(f.CPUCall))
		if g.PerSecond > res.Get.PerSecond {
			res.Get = g
		}
		if f.PerSecond > res.GetFloor.PerSecond {
			res.GetFloor = f
		}
		if cfg.SkipQvmLs {
			continue
		}
		order := []string{floorSock, socket}
		if round%2 == 1 {
			order = []string{socket, floorSock}
		}
		var took, cpu [2]time.Duration
		for i, sock := range order {
			c0 := processCPU()
			d, n, err := qvmLsMean(sock, qvmLsSample)
			if err != nil {
				return res, fmt.Errorf("qvm-ls: %w", err)
			}
			took[i], cpu[i] = d, (processCPU()-c0)/time.Duration(n)
		}
		if round%2 == 1 {
			took[0], took[1] = took[1], took[0]
			cpu[0], cpu[1] = cpu[1], cpu[0]
		}
		lsFloor, ls = append(lsFloor, took[0]), append(ls, took[1])
		lsRatios = append(lsRatios, float64(took[1])/float64(took[0]))
		lsCPU = append(lsCPU, float64(cpu[1])/float64(cpu[0]))

		change := fmt.Sprintf("admin.vm.feature.Set+bench.cold dom0 name dom0\x00%d", round)
		if err := recordCall(socket, []byte(change), nil); err != nil {
			return res, fmt.Errorf("change before a cold qvm-ls: %w", err)
		}
		// Whatever the change sets off after its reply (qubes.xml, consumers of its
		// events) lands on the first run: which one alternates, as above.
		for i, sock := range order {
			c0 := processCPU()
			d, err := qvmLs(sock, nil)
			if err != nil {
				return res, fmt.Errorf("qvm-ls after a change: %w", err)
			}
			took[i], cpu[i] = d, processCPU()-c0
		}
		if round%2 == 0 { // order was floor, qubesbus
			took[0], took[1] = took[1], took[0]
			cpu[0], cpu[1] = cpu[1], cpu[0]
		}
		cold = append(cold, took[0])
		coldRatios = append(coldRatios, float64(took[0])/float64(took[1]))
		coldCPU = append(coldCPU, float64(cpu[0])/float64(cpu[1]))
	}
	if err := ctx.Err(); err != nil {
		return res, err
	}
	res.GetRatio, res.GetCPURatio = median(getRatios), median(getCPU)
	if len(ls) > 0 {
		res.QvmLsRatio, res.QvmLsCPURatio = median(lsRatios), median(lsCPU)
		res.QvmLs, res.QvmLsFloor = medianDuration(ls), medianDuration(lsFloor)
		res.QvmLsCold, res.QvmLsColdRatio, res.QvmLsColdCPURatio = medianDuration(cold), median(coldRatios), median(coldCPU)
	}
	return res, nil
}

// RecordReads makes the calls of the reads the recorded floor answers on socket, and
// returns them with their answers: getRequest and, with qvmLsToo, the qvm-ls shape
// (admin.vm.List, then GetAll of every qube it lists).
func RecordReads(socket string, qvmLsToo bool) (*gateway.Recording, error) {
	rec := gateway.NewRecording()
	record := func(req, resp []byte) error { return rec.Add(req, resp) }
	if err := recordCall(socket, []byte(getRequest), record); err != nil {
		return nil, err
	}
	if qvmLsToo {
		if _, err := qvmLs(socket, record); err != nil {
			return nil, fmt.Errorf("record qvm-ls: %w", err)
		}
	}
	return rec, nil
}

// recordCall makes one call and hands request and response to record.
func recordCall(socket string, req []byte, record func(req, resp []byte) error) error {
	b, err := Call(socket, req)
	if err != nil {
		return err
	}
	if len(b) < 2 || b[0] != '0' {
		return fmt.Errorf("%.40q: not ok: %.60q", req, b)
	}
	if record != nil {
		return record(req, b)
	}
	return nil
}

// errQvmLs marks a qvm-ls-shaped run that got an answer it could not use.
var errQvmLs = errors.New("qvm-ls shape failed")

// qvmLsSample is how long a warm qvm-ls measurement repeats the pass: at 9 qubes one
// pass is 11 calls and about 1 ms, too short for one sample to say much (the first
// calls after the run before pay for waking idle CPUs); at 9 999 qubes one pass is
// longer than this anyway.
const qvmLsSample = 100 * time.Millisecond

// qvmLsMean runs the qvm-ls shape until at least minTime has passed (once at least)
// and returns the mean time of a pass and how many ran.
func qvmLsMean(socket string, minTime time.Duration) (time.Duration, int, error) {
	start := time.Now()
	for n := 1; ; n++ {
		if _, err := qvmLs(socket, nil); err != nil {
			return 0, n, err
		}
		if el := time.Since(start); el >= minTime {
			return el / time.Duration(n), n, nil
		}
	}
}

// qvmLs is the qvm-ls-shaped workload: the list, then GetAll of every qube, in turn.
// Each call and its response go to record, if not nil.
func qvmLs(socket string, record func(req, resp []byte) error) (time.Duration, error) {
	start := time.Now()
	list := []byte("admin.vm.List+ dom0 name dom0\x00")
	b, err := Call(socket, list)
	if err != nil {
		return 0, err
	}
	if len(b) < 2 || b[0] != '0' {
		return 0, fmt.Errorf("%w: List answered %.60q", errQvmLs, b)
	}
	if record != nil {
		if err := record(list, b); err != nil {
			return 0, err
		}
	}
	for _, line := range strings.Split(strings.TrimSuffix(string(b[2:]), "\n"), "\n") {
		name, _, _ := strings.Cut(line, " ")
		if err := recordCall(socket, []byte("admin.vm.property.GetAll+ dom0 name "+name+"\x00"), record); err != nil {
			return 0, fmt.Errorf("%w: GetAll of %s: %w", errQvmLs, name, err)
		}
	}
	return time.Since(start), nil
}

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[len(s)/2]
}

func medianDuration(xs []time.Duration) time.Duration {
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[len(s)/2]
}
