package system

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
)

// repoTestdata is the repository's recorded data (copied from the real qubesd).
const repoTestdata = "../../../../testdata"

// startSystem runs a whole host with embedded NATS in a temp dir.
func startSystem(t testing.TB, mutate ...func(*Config)) *System {
	t.Helper()
	dir := t.TempDir()
	cfg := Config{
		Socket:   filepath.Join(dir, "qubesd.sock"),
		DataDir:  filepath.Join(dir, "data"),
		QubesXML: filepath.Join(repoTestdata, "qubes.xml"),
		HostID:   "test",
		NATSPort: -1,
		// The recordings' qrexec policy; everything else from a non-dom0 source is
		// denied by default.
		PolicyFile: filepath.Join(repoTestdata, "policy", "recorded.policy"),
	}
	for _, m := range mutate {
		m(&cfg)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	sys, err := Start(ctx, cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatalf("start system: %v", err)
	}
	t.Cleanup(func() {
		if err := sys.Stop(); err != nil {
			t.Errorf("stop: %v", err)
		}
	})
	return sys
}

// roundTrip sends raw request bytes, half-closes, and reads the response to EOF.
func roundTrip(t testing.TB, socket string, req []byte) []byte {
	t.Helper()
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: socket, Net: "unix"})
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write(req); err != nil {
		t.Fatalf("write: %v", err)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatalf("half-close: %v", err)
	}
	resp, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	return resp
}

// exchange is one recorded socket connection.
type exchange struct {
	Case     string `json:"case"`
	Request  []byte `json:"-"`
	Response []byte `json:"-"`
	ReqB64   string `json:"request_b64"`
	RespB64  string `json:"response_b64"`
}

func loadTranscript(t testing.TB, name string) []exchange {
	t.Helper()
	f, err := os.Open(filepath.Join(repoTestdata, "transcripts", name))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []exchange
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 16<<20)
	for sc.Scan() {
		var e exchange
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if e.ReqB64 == "" && e.Case == "" {
			continue // the tool_run line
		}
		if e.Request, err = base64.StdEncoding.DecodeString(e.ReqB64); err != nil {
			t.Fatal(err)
		}
		if e.Response, err = base64.StdEncoding.DecodeString(e.RespB64); err != nil {
			t.Fatal(err)
		}
		out = append(out, e)
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// foundationCases are the raw-errors cases the gateway and the registry alone decide
// (framing, pre-handler checks) plus the list calls they need.
var foundationCases = []string{
	"framing-no-nul", "framing-too-few-fields", "framing-bad-dest-type", "framing-keyword-adminvm",
	"framing-no-plus", "framing-empty", "framing-nonascii-method",
	"err-unknown-method", "err-unknown-method-nonadmin",
	"err-bad-dest-missing-vm", "err-bad-dest-invalid-name", "err-bad-dest-bad-uuid", "err-bad-dest-unknown-uuid", "err-bad-src",
	"err-unexpected-payload", "err-unexpected-argument", "err-expected-argument", "err-expected-payload",
	"err-dest-must-be-adminvm", "err-dest-must-not-be-adminvm",
	"ok-vm-list", "ok-vm-list-single", "ok-dest-uuid", "ok-label-list",
}

// rawErrorCases indexes raw-errors.jsonl by case name.
func rawErrorCases(t *testing.T) map[string]exchange {
	t.Helper()
	byCase := map[string]exchange{}
	for _, e := range loadTranscript(t, "raw-errors.jsonl") {
		byCase[e.Case] = e
	}
	return byCase
}

// replayCases sends the named raw-errors cases, each on its own connection, and
// compares the responses byte for byte.
func replayCases(t *testing.T, sys *System, byCase map[string]exchange, names []string) {
	t.Helper()
	for _, name := range names {
		e, ok := byCase[name]
		if !ok {
			t.Fatalf("case %s missing from the transcript", name)
		}
		t.Run(name, func(t *testing.T) {
			if got := roundTrip(t, sys.Socket, e.Request); !bytes.Equal(got, e.Response) {
				t.Errorf("request %q\n got %q\nwant %q", e.Request, got, e.Response)
			}
		})
	}
}

func TestReplayRawErrorsFoundation(t *testing.T) {
	replayCases(t, startSystem(t), rawErrorCases(t), foundationCases)
}

func TestVMClassList(t *testing.T) {
	sys := startSystem(t)
	got := roundTrip(t, sys.Socket, []byte("admin.vmclass.List+ dom0 name dom0\x00"))
	want := "0\x00AppVM\nTemplateVM\nStandaloneVM\nAdminVM\nDispVM\nRemoteVM\n"
	if string(got) != want {
		t.Fatalf("got %q, want %q", got, want)
	}
	if got := roundTrip(t, sys.Socket, []byte("admin.vmclass.List+ dom0 name work\x00")); string(got) != "2\x00ProtocolError\x00\x00expected destination to be AdminVM\x00" {
		t.Fatalf("non-dom0 dest: %q", got)
	}
}

// connectAs connects to the system's NATS as a role, with the role's key.
func connectAs(t testing.TB, sys *System, role string) *nats.Conn {
	t.Helper()
	nc, err := sys.ConnectAs(context.Background(), role, t.Name()+"-"+role)
	if err != nil {
		t.Fatalf("connect as %s: %v", role, err)
	}
	return nc
}

// TestStopWaitsForTheDeviceWatch: Stop returns only once the devices service's watch,
// which outlives its handlers, has handed back every input it took.
func TestStopWaitsForTheDeviceWatch(t *testing.T) {
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	sys, err := Start(ctx, Config{Socket: filepath.Join(dir, "qubesd.sock"), DataDir: filepath.Join(dir, "data"),
		QubesXML: filepath.Join(repoTestdata, "qubes.xml"), HostID: "test", NATSPort: -1}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	if len(sys.background) == 0 {
		t.Fatal("the device watch is not among what Stop waits for")
	}
	for _, stopped := range sys.background {
		select {
		case <-stopped:
			t.Fatal("background work ended before Stop")
		default:
		}
	}
	if err := sys.Stop(); err != nil {
		t.Fatal(err)
	}
	for _, stopped := range sys.background {
		select {
		case <-stopped:
		default:
			t.Fatal("Stop returned while background work still ran")
		}
	}
}
