package system

import (
	"bytes"
	"fmt"
	"path/filepath"
	"testing"
)

// The series 40 → 89 was recorded against one qubesd started fresh from the fixture,
// run after run (testdata/README: pools, volumes, a start of work, devices, clones,
// creations in pool2, the firewall, PCI assignment). Each service's replay test sends
// the whole series in order, so that the state every run saw carries over, and
// compares the runs it covers.

// seriesRun is one recorded tool run of the series.
type seriesRun struct {
	Num       int
	File      string
	Exchanges []exchange
}

// loadSeries returns the runs 40 to 89 in order.
func loadSeries(t *testing.T) []seriesRun {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(repoTestdata, "transcripts", "[4-8][0-9]-*.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	var runs []seriesRun
	for _, f := range files {
		base := filepath.Base(f)
		var num int
		if _, err := fmt.Sscanf(base, "%02d-", &num); err != nil {
			t.Fatalf("%s: %v", base, err)
		}
		runs = append(runs, seriesRun{Num: num, File: base, Exchanges: loadTranscript(t, base)})
	}
	if len(runs) != 50 {
		t.Fatalf("%d runs in the series, want 50 (40 to 89)", len(runs))
	}
	return runs
}

// replaySeries sends every request of the series to a fresh system in recorded
// order and compares the responses of the runs check selects, after mask (which may
// be nil) has hidden what is not deterministic in both. It returns how many responses
// it compared.
func replaySeries(t *testing.T, sys *System, check func(run int) bool, mask func([]byte) []byte) (compared int) {
	t.Helper()
	if mask == nil {
		mask = func(b []byte) []byte { return b }
	}
	for _, run := range loadSeries(t) {
		for i, e := range run.Exchanges {
			got := roundTrip(t, sys.Socket, e.Request)
			if !check(run.Num) {
				continue
			}
			compared++
			if g, w := mask(lifeMask(got)), mask(lifeMask(e.Response)); !bytes.Equal(g, w) {
				t.Errorf("%s #%d %s\nrequest %q\n    got %q\n   want %q", run.File, i, requestMethod(e.Request), e.Request, g, w)
			}
		}
	}
	return compared
}

// runsIn selects the runs in the given ranges (inclusive pairs).
func runsIn(ranges ...[2]int) func(int) bool {
	return func(n int) bool {
		for _, r := range ranges {
			if n >= r[0] && n <= r[1] {
				return true
			}
		}
		return false
	}
}
