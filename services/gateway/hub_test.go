package gateway

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// hubHarness is a hub without a feed, and subscribers on socket pairs whose pumps
// run until the test ends.
type hubHarness struct {
	t      *testing.T
	e      *Events
	h      *hub
	ctx    context.Context
	cancel context.CancelFunc
	pumps  sync.WaitGroup
}

func newHubHarness(t *testing.T, buffer int) *hubHarness {
	e := &Events{cfg: EventsConfig{WriteTimeout: 10 * time.Second, Buffer: buffer}, log: slog.New(slog.DiscardHandler)}
	ctx, cancel := context.WithCancel(context.Background())
	hh := &hubHarness{t: t, e: e, h: newHub(e), ctx: ctx, cancel: cancel}
	t.Cleanup(func() { cancel(); hh.pumps.Wait() })
	return hh
}

// subscribe registers a subscriber; its pump starts at once with start unless start
// is 0 (then startPump does it).
func (hh *hubHarness) subscribe(vm string, start uint64) (*subscriber, *net.UnixConn, *net.UnixConn, chan struct{}) {
	server, client := socketPair(hh.t)
	s, err := newSubscriber(server, vm)
	if err != nil {
		hh.t.Fatal(err)
	}
	hh.h.mu.Lock()
	hh.h.subs[s] = struct{}{}
	hh.h.mu.Unlock()
	done := make(chan struct{})
	if start > 0 {
		hh.startPump(s, server, start, done)
	}
	return s, server, client, done
}

func (hh *hubHarness) startPump(s *subscriber, c *net.UnixConn, start uint64, done chan struct{}) {
	hh.pumps.Add(1)
	go func() {
		defer hh.pumps.Done()
		defer close(done)
		hh.e.pump(hh.ctx, c, s, start, "test")
	}()
}

// waitDirect waits until the pump has caught up and handed the socket to the hub.
func waitDirect(s *subscriber) {
	for {
		s.mu.Lock()
		d := s.direct
		s.mu.Unlock()
		if d {
			return
		}
		runtime.Gosched()
	}
}

func frameN(vm string, i int, size int) []byte {
	return AppendEvent(nil, vm, "domain-feature-set:test", "feature", "test", "value", fmt.Sprintf("%d-%s", i, bytes.Repeat([]byte("x"), size)))
}

// Frames arrive byte for byte in order while the socket fills and drains, so that the
// socket keeps passing between the hub's direct writes and the pump's queue.
func TestHubOrderAcrossFullSocket(t *testing.T) {
	hh := newHubHarness(t, 1<<20)
	_, server, client, _ := hh.subscribe("", 1)
	// A small send buffer makes the hub hit a full socket (and partial writes) often.
	rc, _ := server.SyscallConn()
	rc.Control(func(fd uintptr) { _ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUF, 4096) })
	var want bytes.Buffer
	got := make(chan []byte, 1)
	const n = 3000
	for i := range n {
		want.Write(frameN("work", i, i%1500))
	}
	go func() {
		b := make([]byte, want.Len())
		_, err := io.ReadFull(client, b[:want.Len()/2])
		if err == nil {
			// Let the socket stay full for a while, then read the rest in small reads.
			runtime.Gosched()
			for off := want.Len() / 2; off < len(b) && err == nil; {
				var m int
				m, err = client.Read(b[off:min(off+333, len(b))])
				off += m
			}
		}
		if err != nil {
			b = nil
		}
		got <- b
	}()
	for i := range n {
		hh.h.deliverStored(feedEvent{}, item{seq: uint64(i + 1), vm: "work", frame: frameN("work", i, i%1500)})
		if i%500 == 0 {
			runtime.Gosched()
		}
	}
	b := <-got
	if !bytes.Equal(b, want.Bytes()) {
		t.Fatalf("received %d bytes, want %d, or different bytes (first difference at %d)", len(b), want.Len(), firstDiff(b, want.Bytes()))
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// A qube's subscriber gets only its qube's frames, and nobody gets frames from before
// its start sequence, whether they were queued before its pump started or arrive after
// it handed the socket to the hub (the feed may lag behind the stream).
func TestHubFiltersAndDropsBeforeStart(t *testing.T) {
	hh := newHubHarness(t, 256)
	all, allConn, allClient, allDone := hh.subscribe("", 0)
	work, workConn, workClient, workDone := hh.subscribe("work", 0)
	vms := []string{"work", "sys-net", "", "work", "work", "sys-net", "work", ""}
	frames := make([][]byte, len(vms))
	for i, vm := range vms {
		frames[i] = frameN(vm, i, 10)
	}
	const start = 3 // sequences are i+1: frames 2… are relayed
	for i := range 4 {
		hh.h.deliverStored(feedEvent{}, item{seq: uint64(i + 1), vm: vms[i], frame: frames[i]})
	}
	hh.startPump(all, allConn, start, allDone)
	hh.startPump(work, workConn, start, workDone)
	waitDirect(all)
	waitDirect(work)
	for i := 4; i < len(vms); i++ {
		hh.h.deliverStored(feedEvent{}, item{seq: uint64(i + 1), vm: vms[i], frame: frames[i]})
	}
	var wantAll, wantWork []byte
	for i, vm := range vms {
		if uint64(i+1) < start {
			continue
		}
		wantAll = append(wantAll, frames[i]...)
		if vm == "work" {
			wantWork = append(wantWork, frames[i]...)
		}
	}
	hh.cancel()
	<-allDone
	<-workDone
	allConn.Close()
	workConn.Close()
	for _, c := range []struct {
		name   string
		client *net.UnixConn
		want   []byte
	}{{"dom0", allClient, wantAll}, {"work", workClient, wantWork}} {
		b, err := io.ReadAll(c.client)
		if err != nil || !bytes.Equal(b, c.want) {
			t.Errorf("%s subscriber got %q (%v), want %q", c.name, b, err, c.want)
		}
	}
}

// A subscriber that stops reading is cut off once its queue holds a whole buffer,
// while another one gets every frame.
func TestHubCutsOffSubscriberThatFellBehind(t *testing.T) {
	hh := newHubHarness(t, 8)
	slow, _, _, slowDone := hh.subscribe("", 1)
	_, _, fastClient, _ := hh.subscribe("", 1)
	const n = 2000 // about 2 MB: more than the slow socket and queue hold
	b := make([]byte, 0, 2000)
	for i := range n {
		f := frameN("work", i, 1000)
		hh.h.deliverStored(feedEvent{}, item{seq: uint64(i + 1), vm: "work", frame: f})
		// The fast one reads each frame before the next is sent: it never falls behind.
		b = b[:len(f)]
		if _, err := io.ReadFull(fastClient, b); err != nil || !bytes.Equal(b, f) {
			t.Fatalf("fast subscriber, frame %d: %q %v", i, b, err)
		}
	}
	<-slowDone
	if !errors.Is(slow.cause, errFellBehind) {
		t.Errorf("slow subscriber cut off because of %v, want %v", slow.cause, errFellBehind)
	}
}

// A client that went away is cut off by the hub's next write, which ends its pump.
func TestHubWriteToGoneClientEndsPump(t *testing.T) {
	hh := newHubHarness(t, 256)
	s, _, client, done := hh.subscribe("", 1)
	waitDirect(s)
	client.Close()
	hh.h.deliverStored(feedEvent{}, item{seq: 1, vm: "work", frame: frameN("work", 1, 10)})
	<-done
	if errors.Is(s.cause, errFellBehind) || errors.Is(s.cause, errClientGone) {
		t.Fatalf("cut off because of %v, want the write error", s.cause)
	}
	// Later frames are not written (nor queued) any more.
	hh.h.deliverStored(feedEvent{}, item{seq: 2, vm: "work", frame: frameN("work", 2, 10)})
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.queue) != 0 {
		t.Fatalf("%d frames queued for a cut-off subscriber", len(s.queue))
	}
}
