package lab

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/bus/lease"
	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/access"
)

func call(t *testing.T, socket, req string) []byte {
	t.Helper()
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: socket, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := c.Write([]byte(req)); err != nil {
		t.Fatal(err)
	}
	_ = c.CloseWrite()
	b, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// checkHosts makes qvm-ls-shaped calls on every host: the list, then GetAll of every
// qube, each answered by that host only.
func checkHosts(t *testing.T, l *Lab, qubes int) {
	t.Helper()
	var wg sync.WaitGroup
	for _, h := range l.Hosts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			list := call(t, h.Socket, "admin.vm.List+ dom0 name dom0\x00")
			if !bytes.HasPrefix(list, []byte("0\x00dom0 class=AdminVM")) {
				t.Errorf("%s: list %.80q", h.ID, list)
				return
			}
			lines := bytes.Split(bytes.TrimSuffix(list[2:], []byte("\n")), []byte("\n"))
			if want := 9 + qubes; len(lines) != want {
				t.Errorf("%s: %d qubes, want %d", h.ID, len(lines), want)
			}
			// qvm-ls: then every qube's properties in one GetAll each.
			for _, l := range lines {
				name := string(bytes.Fields(l)[0])
				resp := call(t, h.Socket, "admin.vm.property.GetAll+ dom0 name "+name+"\x00")
				if !bytes.HasPrefix(resp, []byte("0\x00")) || !bytes.Contains(resp, []byte(" type=str "+name+"\n")) {
					t.Errorf("%s: GetAll %s answered %.80q", h.ID, name, resp)
				}
			}
		}()
	}
	wg.Wait()
}

func TestLabEmbedded(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	dir := t.TempDir()
	l, err := Start(ctx, Config{Hosts: 3, Qubes: 10, Seed: "../../../../testdata/qubes.xml", Dir: dir, NATSPort: -1}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Stop()
	checkHosts(t, l, 10)

	// The lab's lifecycle leases live DefaultLeaseTTL, not the 5 s of a single host.
	opt, err := nats.NkeyOptionFromSeed(access.SeedFile(filepath.Join(dir, "nkeys"), access.Admin))
	if err != nil {
		t.Fatal(err)
	}
	nc, err := nats.Connect(l.NATS.ClientURL(), opt)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	kv, err := js.KeyValue(ctx, lease.Bucket)
	if err != nil {
		t.Fatal(err)
	}
	st, err := kv.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.TTL() != DefaultLeaseTTL {
		t.Errorf("lease bucket TTL %v, want %v", st.TTL(), DefaultLeaseTTL)
	}
}

// TestLabCluster is the lab: 20 hosts × 50 qubes on a 3-node JetStream cluster,
// hosts spread over the nodes.
func TestLabCluster(t *testing.T) {
	hosts, qubes := 20, 50
	if testing.Short() {
		hosts, qubes = 4, 10
	}
	servers := bustest.RunCluster(t, 3)
	var urls []string
	for _, s := range servers {
		urls = append(urls, s.ClientURL())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	l, err := Start(ctx, Config{Hosts: hosts, Qubes: qubes, Seed: "../../../../testdata/qubes.xml", Dir: t.TempDir(), URLs: urls, Replicas: 3, Parallel: 2}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Stop()
	if len(l.Hosts) != hosts {
		t.Fatal(fmt.Sprint(len(l.Hosts)))
	}
	checkHosts(t, l, qubes)
}
