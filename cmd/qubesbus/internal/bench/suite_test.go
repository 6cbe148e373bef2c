package bench

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"
)

// A short run of the whole suite produces every table with real measurements.
func TestSuiteMeasures(t *testing.T) {
	cfg := Config{Seed: "../../../../testdata/qubes.xml", Dir: t.TempDir(), Duration: 200 * time.Millisecond,
		Clients: []int{1, 4}, Scales: []int{2}, Subscribers: []int{2}, Classes: []string{"admin.vm.List"},
		FloorClients: 2, Rounds: 2}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	rep, err := Suite(ctx, cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Floors) != 4 {
		t.Fatalf("%d floor results, want 4", len(rep.Floors))
	}
	for _, r := range append(rep.Floors, rep.Classes[2]...) {
		if r.Calls == 0 || r.Errors != 0 || r.P50 <= 0 || r.P99 < r.P50 {
			t.Errorf("%s ×%d: %+v", r.Class, r.Clients, r)
		}
	}
	// The floor, a service of the gateway's process, one of another.
	if len(rep.Events) != 3 {
		t.Fatalf("events: %+v (want 3 fan-outs)", rep.Events)
	}
	for i, e := range rep.Events {
		if e.By != Publisher(i) || e.Subscribers != 2 || e.Events != 1000 || e.P50 <= 0 || e.P99 < e.P50 {
			t.Errorf("events by %v: %+v (want 500 events to each of 2 subscribers)", Publisher(i), e)
		}
	}
	if len(rep.Reads) != 1 {
		t.Fatalf("reads against the floor: %+v", rep.Reads)
	}
	if r := rep.Reads[0]; r.Qubes != 11 || r.Get.Calls == 0 || r.GetFloor.Calls == 0 || r.GetRatio <= 0 || r.GetCPURatio <= 0 || r.QvmLsCPURatio <= 0 || r.QvmLsCold <= 0 || r.QvmLsColdCPURatio <= 0 || r.QvmLs <= 0 || r.QvmLsFloor <= 0 || r.QvmLsRatio <= 0 {
		t.Errorf("reads against the floor: %+v", r)
	}
	var out bytes.Buffer
	Print(&out, rep, cfg)
	for _, want := range []string{"floor: NATS request-reply", "floor: socket round trip", "| 11 | admin.vm.List | 4 |", "publish→socket", "| 2 | floor: a bare socket server's fan-out |", "| 2 | a service of the gateway's process |", "| 2 | a service of another process |", "| 11 | property.Get, 2 clients", "| 11 | qvm-ls shape", "| 11 | the same right after a change"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("report lacks %q:\n%s", want, out.String())
		}
	}
}
