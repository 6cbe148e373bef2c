package system

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/qubesbus/qubesbus/bus/bustest"
)

// The host the series 40 → 89 and raw-api2 were recorded on (testdata README): every
// pool directory reports a 100 GiB filesystem with 20 GiB used, images are sparse,
// revision names carry the image's mtime, stamped 2025-01-01T00:00:00, and one kernel,
// 6.12.40-1.fc41, is installed. Clone tokens come from the reference's seeded
// generator: the host hands out the recorded ones, in order.
func recordedStorageHost(t *testing.T, tokens []string) func(*Config) {
	return func(c *Config) {
		root := filepath.Join(t.TempDir(), "root")
		// The recorded host's kernel, with the files the oracle makes for it (a
		// start verifies vmlinuz).
		kernel := filepath.Join(root, "var/lib/qubes/vm-kernels/6.12.40-1.fc41")
		if err := os.MkdirAll(kernel, 0o755); err != nil {
			t.Fatal(err)
		}
		for _, f := range []string{"vmlinuz", "initramfs", "modules.img"} {
			if err := os.WriteFile(filepath.Join(kernel, f), nil, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		stamp := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
		c.Storage = StorageHost{
			Root:   root,
			StatFS: func(string) (int64, int64, error) { return 100 << 30, 20 << 30, nil },
			Stamp:  &stamp,
			NewToken: func() string {
				if len(tokens) == 0 {
					t.Error("more clone tokens asked for than recorded")
					return "exhausted"
				}
				tok := tokens[0]
				tokens = tokens[1:]
				return tok
			},
		}
	}
}

// recordedTokens are the responses of admin.vm.volume.CloneFrom in the given
// exchanges, in order.
func recordedTokens(exchanges ...[]exchange) []string {
	var out []string
	for _, ex := range exchanges {
		for _, e := range ex {
			if requestMethod(e.Request) == "admin.vm.volume.CloneFrom" && bytes.HasPrefix(e.Response, []byte("0\x00")) {
				out = append(out, string(e.Response[2:]))
			}
		}
	}
	return out
}

// poolRepr masks the memory address in the Python repr of a pool in use
// (QubesPoolInUseError): it differs between runs of qubesd itself.
var poolRepr = regexp.MustCompile(`(<qubes\.storage\.[A-Za-z.]+ object at )0x[0-9a-f]+>`)

func storageMask(b []byte) []byte { return poolRepr.ReplaceAll(b, []byte("${1}‹addr›>")) }

// seriesExtraEvents are events qubesbus sends in a run of the series beyond the
// recording's, each after the event named with it. The oracle's QubesDB stand-in never
// fires a watch and holds sys-net's block device sda from the start, so qubesd's block
// extension (qubes/ext/block.py) filled its cache when it loaded sys-net and saw no
// change when sys-net started. On real Qubes a halted backend has no QubesDB to read at
// load, and its block devices come with the /qubes-block-devices watch once it runs
// (device-list-change, then device-added for each), at a moment of their own; the
// simulated hypervisor behaves that way.
var seriesExtraEvents = map[int]struct {
	after  string
	frames []string
}{
	58: {"1\x00sys-net\x00domain-start\x00start_guid\x00True\x00\x00", []string{
		"1\x00sys-net\x00device-list-change:block\x00\x00",
		"1\x00sys-net\x00device-added:block\x00device\x00sys-net:sda::None\x00\x00",
	}},
}

// withoutExtras checks that got holds the extra frames in their order, after the event
// they follow, and returns got without them.
func withoutExtras(got []string, after string, extra []string) ([]string, error) {
	if len(extra) == 0 {
		return got, nil
	}
	start := slices.Index(got, after)
	if start < 0 {
		return nil, fmt.Errorf("no %q", after)
	}
	var rest []string
	next := 0
	for i, g := range got {
		if i > start && next < len(extra) && g == extra[next] {
			next++
			continue
		}
		rest = append(rest, g)
	}
	if next < len(extra) {
		return nil, fmt.Errorf("no %q after %q", extra[next], after)
	}
	return rest, nil
}

// TestReplayStorageSeries replays the series 40 → 89 and compares the storage runs:
// pools (40–51), the volumes of work (52–57, 65–70: resize, the revision its stop in
// 65 committed, revert, settings), the start of work (58), clones (71–73, with the
// firewall and device assignments qvm-clone copies), qubes created in pool2 (74–76),
// the refused removal of pool2 (77) and a revert to a revision that does not exist
// (82). TestReplayDevicesSeries compares the other runs' responses; the events of
// every run are compared here, as stored in QUBES_EVENTS, with the recorded ones. Masked: the uuids of the qubes created during the
// series (random in qubesd) and the address in a pool's Python repr.
func TestReplayStorageSeries(t *testing.T) {
	runs := loadSeries(t)
	var all [][]exchange
	for _, r := range runs {
		all = append(all, r.Exchanges)
	}
	sys := startSystem(t, recordedStorageHost(t, recordedTokens(all...)))
	check := runsIn([2]int{40, 58}, [2]int{65, 77}, [2]int{82, 82})
	created := []string{"work-clone", "personal-p2", "poolvm", "poolvm2"}
	compared, eventsCompared := 0, 0
	events := captureLifeEvents(t, sys, "test")
	for _, run := range runs {
		mark := events.mark(t)
		for i, e := range run.Exchanges {
			got := roundTrip(t, sys.Socket, e.Request)
			method := requestMethod(e.Request)
			if !check(run.Num) {
				continue
			}
			compared++
			g := storageMask(normalise(lifeMask(got), created))
			w := storageMask(normalise(lifeMask(e.Response), created))
			if !bytes.Equal(g, w) {
				t.Errorf("%s #%d %s\nrequest %q\n    got %q\n   want %q", run.File, i, method, e.Request, g, w)
			}
		}
		want := recordedFrames(t, strings.TrimSuffix(run.File, ".jsonl")+".events.txt")[1:]
		extra := seriesExtraEvents[run.Num]
		bustest.CheckFor(t, 30*time.Second, 5*time.Millisecond, func() error {
			if got := events.since(mark); len(got) < len(want)+len(extra.frames) {
				return fmt.Errorf("%s: %d events of %d: got %q, want %q and %q", run.File, len(got), len(want)+len(extra.frames), got, want, extra.frames)
			}
			return nil
		})
		got, err := withoutExtras(events.since(mark), extra.after, extra.frames)
		if err != nil {
			t.Errorf("%s events: %v", run.File, err)
		} else if !slices.Equal(got, want) {
			t.Errorf("%s events\n got %q\nwant %q", run.File, got, want)
		}
		eventsCompared += len(want)
	}
	t.Logf("%d responses and %d events compared", compared, eventsCompared)
}

// TestReplayRawAPI2Storage replays the raw-api2 cases of pools and volumes in their
// recorded order against a fresh system.
func TestReplayRawAPI2Storage(t *testing.T) {
	ex := loadTranscript(t, "raw-api2.jsonl")
	var todo []exchange
	for _, e := range ex {
		m := requestMethod(e.Request)
		if strings.HasPrefix(m, "admin.pool.") || strings.HasPrefix(m, "admin.vm.volume.") {
			todo = append(todo, e)
		}
	}
	sys := startSystem(t, recordedStorageHost(t, recordedTokens(ex)))
	compared := 0
	for i, e := range todo {
		got := roundTrip(t, sys.Socket, e.Request)
		compared++
		if g, w := storageMask(got), storageMask(e.Response); !bytes.Equal(g, w) {
			t.Errorf("%s #%d\nrequest %q\n    got %q\n   want %q", e.Case, i, e.Request, g, w)
		}
	}
	t.Logf("%d cases compared", compared)
}
