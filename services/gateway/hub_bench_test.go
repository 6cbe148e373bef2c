package gateway

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/qubesbus/qubesbus/bus/cloudevent"
)

// socketPair returns both ends of a connected Unix stream socket.
func socketPair(tb testing.TB) (*net.UnixConn, *net.UnixConn) {
	tb.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		tb.Fatal(err)
	}
	var cs [2]*net.UnixConn
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			tb.Fatal(err)
		}
		cs[i] = c.(*net.UnixConn)
		tb.Cleanup(func() { cs[i].Close() })
	}
	return cs[0], cs[1]
}

// BenchmarkHubFanOut measures one event's way from the hub to every subscriber's
// socket: each iteration delivers one frame and waits until the clients have read it
// all. The clients are read by one thread through epoll, as an event loop in another
// process would, so that the figure is the gateway's work rather than the readers'.
func BenchmarkHubFanOut(b *testing.B) {
	frame := appendCloudEvent(nil, cloudevent.New("work", "domain-feature-set:bench", "feature", "bench", "value", "1754000000000000000"))
	for _, n := range []int{1, 10, 100} {
		b.Run(fmt.Sprintf("subscribers=%d", n), func(b *testing.B) {
			e := &Events{cfg: EventsConfig{WriteTimeout: 10 * time.Second, Buffer: 256}, log: slog.New(slog.DiscardHandler)}
			h := newHub(e)
			ctx, cancel := context.WithCancel(context.Background())
			var pumps sync.WaitGroup
			defer func() { cancel(); pumps.Wait() }()
			ep, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
			if err != nil {
				b.Fatal(err)
			}
			defer unix.Close(ep)
			for i := range n {
				server, client := rawSocketPair(b)
				ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(client)}
				if err := unix.EpollCtl(ep, unix.EPOLL_CTL_ADD, client, &ev); err != nil {
					b.Fatal(err)
				}
				s := benchSubscriber(b, h, server)
				pumps.Add(1)
				go func() { defer pumps.Done(); e.pump(ctx, server, s, 0, fmt.Sprint("bench", i)) }()
			}
			want := make(chan int)
			got := make(chan struct{})
			go func() {
				ready := make([]unix.EpollEvent, n)
				buf := make([]byte, 64<<10)
				for total := range want {
					for total > 0 {
						k, err := unix.EpollWait(ep, ready, -1)
						if err == unix.EINTR {
							continue
						}
						if err != nil {
							panic(err)
						}
						for _, ev := range ready[:k] {
							m, err := unix.Read(int(ev.Fd), buf)
							if err == nil {
								total -= m
							}
						}
					}
					got <- struct{}{}
				}
			}()
			defer close(want)
			b.ReportAllocs()
			b.ResetTimer()
			for i := range b.N {
				want <- n * len(frame)
				h.deliverStored(feedEvent{}, item{seq: uint64(i + 1), vm: "work", frame: frame})
				<-got
			}
		})
	}
}

// rawSocketPair returns a connected Unix stream socket: the server end as the gateway
// holds it, the client end as a non-blocking descriptor.
func rawSocketPair(tb testing.TB) (*net.UnixConn, int) {
	tb.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		tb.Fatal(err)
	}
	f := os.NewFile(uintptr(fds[0]), "socketpair")
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { c.Close(); unix.Close(fds[1]) })
	return c.(*net.UnixConn), fds[1]
}

// benchSubscriber registers a dom0 subscriber without a feed.
func benchSubscriber(tb testing.TB, h *hub, c *net.UnixConn) *subscriber {
	s, err := newSubscriber(c, "")
	if err != nil {
		tb.Fatal(err)
	}
	h.mu.Lock()
	h.subs[s] = struct{}{}
	h.mu.Unlock()
	return s
}

// BenchmarkHubFrame is the hub's work per event before the fan-out: decode the
// message once and encode the frame every subscriber shares.
func BenchmarkHubFrame(b *testing.B) {
	msg, err := cloudevent.Encode(context.Background(), "bench", cloudevent.New("work", "domain-feature-set:bench", "feature", "bench", "value", "1754000000000000000"))
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		ev, err := cloudevent.DecodeHeaders(msg)
		if err != nil {
			b.Fatal(err)
		}
		_ = appendCloudEvent(nil, ev)
	}
}
