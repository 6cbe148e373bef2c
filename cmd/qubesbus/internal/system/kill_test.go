package system

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/schemas/qubesxml"
)

// killChildEnv makes this test binary serve a whole host (embedded NATS included) in
// the directory it names, until SIGTERM (a clean stop) or SIGKILL.
const killChildEnv = "QUBESBUS_SYSTEM_TEST_KILL_CHILD"

func TestMain(m *testing.M) {
	if dir := os.Getenv(killChildEnv); dir != "" {
		os.Exit(runKillChild(dir))
	}
	os.Exit(m.Run())
}

func runKillChild(dir string) int {
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	startCtx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	sys, err := Start(startCtx, Config{Socket: filepath.Join(dir, "qubesd.sock"), DataDir: filepath.Join(dir, "data"),
		QubesXML: filepath.Join(repoTestdata, "qubes.xml"), HostID: "kill"}, log)
	if err != nil {
		log.Error("start", "err", err)
		return 2
	}
	fmt.Println(bustest.Ready)
	<-ctx.Done()
	if err := sys.Stop(); err != nil {
		log.Error("stop", "err", err)
		return 1
	}
	return 0
}

// startKillChild starts a whole host in another process and waits until it serves.
func startKillChild(t *testing.T, dir string) *bustest.Child {
	t.Helper()
	return bustest.StartChild(t, 2*time.Minute, killChildEnv+"="+dir)
}

// sockCall is one request over the socket: the reply's bytes, or an error when the
// connection failed (the host was killed mid-call: not acknowledged).
func sockCall(socket, req string) (string, error) {
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: socket, Net: "unix"})
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.WriteString(c, req); err != nil {
		return "", err
	}
	if err := c.CloseWrite(); err != nil {
		return "", err
	}
	b, err := io.ReadAll(c)
	return string(b), err
}

// TestKillWholeProcessKeepsAcknowledgedChanges: a whole host (embedded NATS, every
// service, the gateway) in another process takes feature.Set calls from 8 socket
// clients and is killed with SIGKILL right after a random number of them were
// acknowledged, three times. Each restart on the same data dir must hold every
// acknowledged change (the change log had it durably before the reply), and so must
// qubes.xml once the host stops cleanly.
//
// SIGKILL loses what is in the process, not what is in the page cache, so this checks
// that nothing is acknowledged before it is in the stream's files and that a restart
// rebuilds from them; that those files are on the disk itself before the reply is
// TestQubesXMLSavedAfterTheReply's check of the syncs (and persistence's
// TestAckAfterSync).
func TestKillWholeProcessKeepsAcknowledgedChanges(t *testing.T) {
	if testing.Short() {
		t.Skip("starts 4 hosts in other processes")
	}
	const rounds, writers = 3, 8
	dir := t.TempDir()
	socket := filepath.Join(dir, "qubesd.sock")
	seed := uint64(time.Now().UnixNano())
	rng := rand.New(rand.NewPCG(seed, 2))
	t.Logf("random seed %d", seed)
	var (
		mu    sync.Mutex
		acked = map[string]bool{} // feature names on qube work
		n     int
	)
	present := func(list string) []string {
		have := map[string]bool{}
		for _, l := range strings.Split(strings.TrimPrefix(list, "0\x00"), "\n") {
			have[l] = true
		}
		mu.Lock()
		defer mu.Unlock()
		var miss []string
		for name := range acked {
			if !have[name] {
				miss = append(miss, name)
			}
		}
		return miss
	}
	for round := range rounds {
		c := startKillChild(t, dir)
		list, err := sockCall(socket, "admin.vm.feature.List+ dom0 name work\x00")
		if err != nil || !strings.HasPrefix(list, "0\x00") {
			t.Fatalf("round %d: feature.List: %q %v", round, list, err)
		}
		if miss := present(list); len(miss) > 0 {
			t.Fatalf("round %d: the restarted host lacks %d acknowledged changes, e.g. %v", round, len(miss), miss[0])
		}
		killAt := 50 + rng.IntN(250)
		var once sync.Once
		kill := func() { once.Do(c.Kill) }
		var wg sync.WaitGroup
		for w := range writers {
			wg.Go(func() {
				for i := 0; ; i++ {
					name := fmt.Sprintf("r%d.w%d.%d", round, w, i)
					rep, err := sockCall(socket, "admin.vm.feature.Set+"+name+" dom0 name work\x00v")
					if err != nil || rep == "" {
						return // killed mid-call: not acknowledged
					}
					if rep != "0\x00" {
						t.Errorf("feature.Set %s: %q", name, rep)
						kill()
						return
					}
					mu.Lock()
					acked[name] = true
					n++
					if n >= killAt {
						kill() // right after an acknowledgement; other calls are mid-way
					}
					mu.Unlock()
				}
			})
		}
		wg.Wait()
		if err := c.Wait(t, time.Minute); !bustest.WasKilled(err) {
			t.Fatalf("round %d: host ended with %v, not SIGKILL:\n%s", round, err, c.Log())
		}
		if t.Failed() {
			t.FailNow()
		}
		mu.Lock()
		n = 0
		mu.Unlock()
	}

	c := startKillChild(t, dir)
	list, err := sockCall(socket, "admin.vm.feature.List+ dom0 name work\x00")
	if err != nil {
		t.Fatal(err)
	}
	if miss := present(list); len(miss) > 0 {
		t.Fatalf("the last restart lacks %d acknowledged changes, e.g. %v", len(miss), miss[0])
	}
	c.Stop(t, time.Minute)
	conf, err := qubesxml.Load(filepath.Join(dir, "data", "qubes.xml"))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, d := range conf.Domains {
		if d.Name() == "work" {
			for _, f := range d.Features {
				names = append(names, f.Name)
			}
		}
	}
	if miss := present(strings.Join(names, "\n")); len(miss) > 0 {
		t.Fatalf("qubes.xml after the clean stop lacks %d acknowledged changes, e.g. %v", len(miss), miss[0])
	}
	t.Logf("%d acknowledged changes over %d SIGKILLs of the whole host, all kept", len(acked), rounds)
}
