package system

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"testing"
	"time"

	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/access"

	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/sys/unix"

	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/bus/cloudevent"
)

// eventStream is an admin.Events client, as qubesadmin's EventsDispatcher reads it.
type eventStream struct {
	c *net.UnixConn
	r *bufio.Reader
}

// openEvents subscribes and returns once connection-established has arrived.
func openEvents(t testing.TB, socket, dest string) *eventStream {
	t.Helper()
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: socket, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := c.Write([]byte("admin.Events+ dom0 name " + dest + "\x00")); err != nil {
		t.Fatal(err)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	s := &eventStream{c: c, r: bufio.NewReader(c)}
	frame, err := s.next(10 * time.Second)
	if err != nil {
		t.Fatalf("admin.Events %s: %v", dest, err)
	}
	if want := "1\x00\x00connection-established\x00\x00"; string(frame) != want {
		t.Fatalf("first frame %q, want %q", frame, want)
	}
	return s
}

// next reads one whole event frame.
func (s *eventStream) next(timeout time.Duration) ([]byte, error) {
	_ = s.c.SetReadDeadline(time.Now().Add(timeout))
	var frame []byte
	field := func() ([]byte, error) {
		b, err := s.r.ReadBytes(0)
		frame = append(frame, b...)
		return b, err
	}
	head, err := field()
	if err != nil {
		return frame, err
	}
	if string(head) != "1\x00" {
		rest, _ := io.ReadAll(s.r)
		return append(frame, rest...), fmt.Errorf("not an event frame: %q", append(frame, rest...))
	}
	if _, err := field(); err != nil { // subject
		return frame, err
	}
	if _, err := field(); err != nil { // event
		return frame, err
	}
	for i := 0; ; i++ {
		b, err := field()
		if err != nil {
			return frame, err
		}
		if i%2 == 0 && len(b) == 1 { // empty key ends the frame
			return frame, nil
		}
	}
}

func publisherFor(t testing.TB, sys *System) *cloudevent.Publisher {
	t.Helper()
	nc := connectAs(t, sys, access.Admin)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return cloudevent.NewPublisher(js, "test")
}

func TestEventsRelaysFramesAndFilters(t *testing.T) {
	sys := startSystem(t)
	pub := publisherFor(t, sys)
	all := openEvents(t, sys.Socket, "dom0")
	work := openEvents(t, sys.Socket, "work")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	evs := []cloudevent.Event{
		cloudevent.New("sys-net", "domain-start", "start_guid", "True"),
		cloudevent.New("work", "property-set:label", "name", "label", "newvalue", "green", "oldvalue", "red"),
		cloudevent.New("", "domain-add", "vm", "newvm"),
		cloudevent.New("work", "domain-feature-set:service.crond", "feature", "service.crond", "value", "1"),
	}
	if err := pub.Publish(ctx, evs...); err != nil {
		t.Fatal(err)
	}
	want := []string{
		"1\x00sys-net\x00domain-start\x00start_guid\x00True\x00\x00",
		"1\x00work\x00property-set:label\x00name\x00label\x00newvalue\x00green\x00oldvalue\x00red\x00\x00",
		"1\x00\x00domain-add\x00vm\x00newvm\x00\x00",
		"1\x00work\x00domain-feature-set:service.crond\x00feature\x00service.crond\x00value\x001\x00\x00",
	}
	for i, w := range want {
		got, err := all.next(5 * time.Second)
		if err != nil || string(got) != w {
			t.Fatalf("dom0 stream frame %d: %q %v, want %q", i, got, err, w)
		}
	}
	for _, i := range []int{1, 3} {
		got, err := work.next(5 * time.Second)
		if err != nil || string(got) != want[i] {
			t.Fatalf("work stream: %q %v, want %q", got, err, want[i])
		}
	}
	if got, err := work.next(300 * time.Millisecond); err == nil {
		t.Fatalf("work stream got a frame of another qube: %q", got)
	}
}

func TestEventsChecks(t *testing.T) {
	sys := startSystem(t)
	cases := map[string]string{
		"admin.Events+x dom0 name dom0\x00":     "2\x00ProtocolError\x00\x00unexpected argument\x00",
		"admin.Events+ dom0 name dom0\x00p":     "2\x00ProtocolError\x00\x00unexpected payload\x00",
		"admin.Events+ dom0 name nosuch\x00":    "2\x00QubesVMNotFoundError\x00\x00No such domain: 'nosuch'\x00",
		"admin.Events+ nosuch name dom0\x00":    "2\x00QubesVMNotFoundError\x00\x00No such domain: 'nosuch'\x00",
		"admin.Events+ dom0 name uuid:1234\x00": "2\x00QubesVMInvalidUUIDError\x00\x00VM UUID is not valid: '1234'\x00",
	}
	for req, want := range cases {
		if got := roundTrip(t, sys.Socket, []byte(req)); string(got) != want {
			t.Errorf("%q: got %q, want %q", req, got, want)
		}
	}
}

// eventsStream reads QUBES_EVENTS' info over a connection of its own.
func eventsStream(t testing.TB, sys *System) *jetstream.StreamInfo {
	t.Helper()
	nc := connectAs(t, sys, access.Admin)
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := js.Stream(ctx, cloudevent.StreamName)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return info
}

func consumerCount(t testing.TB, sys *System) int { return eventsStream(t, sys).State.Consumers }

func TestEventsSubscribeDisconnectLeavesNothing(t *testing.T) {
	sys := startSystem(t)
	cycles := 1000
	if testing.Short() {
		cycles = 100
	}
	baseConsumers := consumerCount(t, sys)
	// Warm up connections and pools, then take the goroutine baseline.
	for i := 0; i < 5; i++ {
		openEvents(t, sys.Socket, "dom0").c.Close()
	}
	settle := func(want int) error {
		if n := runtime.NumGoroutine(); n > want {
			return fmt.Errorf("%d goroutines, baseline %d", n, want)
		}
		if n := consumerCount(t, sys); n != baseConsumers {
			return fmt.Errorf("%d consumers, baseline %d", n, baseConsumers)
		}
		return nil
	}
	var baseGoroutines int
	bustest.CheckFor(t, 10*time.Second, 50*time.Millisecond, func() error {
		baseGoroutines = runtime.NumGoroutine()
		return settle(baseGoroutines)
	})
	for i := 0; i < cycles; i++ {
		dest := "dom0"
		if i%2 == 1 {
			dest = "work"
		}
		openEvents(t, sys.Socket, dest).c.Close()
	}
	bustest.CheckFor(t, 20*time.Second, 100*time.Millisecond, func() error { return settle(baseGoroutines + 2) })
}

func TestEventsSlowSubscriberIsCutOff(t *testing.T) {
	sys := startSystem(t, func(c *Config) { c.EventsWriteTimeout = time.Second })
	pub := publisherFor(t, sys)
	slow := openEvents(t, sys.Socket, "dom0")
	fast := openEvents(t, sys.Socket, "dom0")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	big := string(bytes.Repeat([]byte("x"), 4000))
	const n = 400 // about 1.6 MB, far more than a socket buffer holds
	errc := make(chan error, 1)
	go func() {
		for i := 0; i < n; i++ {
			if err := pub.Publish(ctx, cloudevent.New("work", "domain-feature-set:f", "feature", "f", "value", big)); err != nil {
				errc <- err
				return
			}
		}
		errc <- nil
	}()
	// The fast subscriber gets everything while the slow one reads nothing.
	for i := 0; i < n; i++ {
		if _, err := fast.next(10 * time.Second); err != nil {
			t.Fatalf("fast subscriber stalled at %d: %v", i, err)
		}
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	// The slow one has not read (n frames are far more than its socket holds, so a
	// write to it is blocked): once the write timeout has passed the gateway cuts it
	// off and closes the socket, and it finds the end of its stream before all n
	// events.
	bustest.CheckFor(t, 30*time.Second, 10*time.Millisecond, func() error {
		if !hungUp(t, slow.c) {
			return errors.New("the gateway has not closed the slow subscriber's socket")
		}
		return nil
	})
	got := 0
	for ; got < n; got++ {
		if _, err := slow.next(10 * time.Second); err != nil {
			if !errors.Is(err, io.EOF) {
				t.Fatalf("slow subscriber: %v, want EOF after the cut", err)
			}
			break
		}
	}
	if got == n {
		t.Fatal("slow subscriber was never cut off")
	}
	t.Logf("slow subscriber cut off after %d of %d events", got, n)
}

func TestEventsStreamLimitsAreSettings(t *testing.T) {
	sys := startSystem(t, func(c *Config) { c.EventsMaxAge, c.EventsMaxBytes = time.Hour, 64<<20 })
	c := eventsStream(t, sys).Config
	if c.MaxAge != time.Hour || c.MaxBytes != 64<<20 || c.Storage != jetstream.FileStorage || c.Replicas != 1 {
		t.Fatalf("stream config: age %s bytes %d storage %v replicas %d", c.MaxAge, c.MaxBytes, c.Storage, c.Replicas)
	}
}

// hungUp reports whether the peer has closed c, without reading: a Unix socket shows
// POLLHUP once both directions are shut, even while unread data is buffered.
func hungUp(t testing.TB, c *net.UnixConn) bool {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var revents int16
	if err := rc.Control(func(fd uintptr) {
		fds := []unix.PollFd{{Fd: int32(fd)}}
		if n, err := unix.Poll(fds, 0); err == nil && n > 0 {
			revents = fds[0].Revents
		}
	}); err != nil {
		t.Fatal(err)
	}
	return revents&unix.POLLHUP != 0
}

// Under the roles' permissions, as deployed, the gateway hears events before the
// stream's consumer brings them: those of the services of its process through the
// tap, as they send them, and those of a service of another process on their subject
// (admin.Events' fast path). A role table without the gateway's subscription, or a
// service publishing past the tap, would still pass every other events test, only
// slower.
func TestEventsFastPathUnderTheRoles(t *testing.T) {
	sys := startSystem(t)
	s := openEvents(t, sys.Socket, "work")
	const n = 20
	waitFor := func(last string) {
		t.Helper()
		for {
			frame, err := s.next(10 * time.Second)
			if err != nil {
				t.Fatalf("waiting for %q: %v", last, err)
			}
			if string(frame) == last {
				return
			}
		}
	}
	for i := range n {
		if resp := roundTrip(t, sys.Socket, []byte(fmt.Sprintf("admin.vm.feature.Set+fast dom0 name work\x00%d", i))); string(resp) != "0\x00" {
			t.Fatalf("feature.Set: %q", resp)
		}
	}
	waitFor(fmt.Sprintf("1\x00work\x00domain-feature-set:fast\x00feature\x00fast\x00value\x00%d\x00oldvalue\x00%d\x00\x00", n-1, n-2))
	tapped, published, stored := sys.obs.gateway.Load().EventsRelayed()
	if tapped == 0 {
		t.Fatalf("no event of properties came through the tap (%d from the subject, %d from the stream)", published, stored)
	}
	t.Logf("properties' events: %d from the tap, %d from the subject, %d from the stream first", tapped, published, stored)

	// A service of another process: a connection of its own, as the properties role.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	nc, err := sys.ConnectAs(ctx, access.Properties, "test-other-process")
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	pub := cloudevent.NewPublisher(js, "test")
	for i := range n {
		if err := pub.Publish(ctx, cloudevent.New("work", "domain-feature-set:other", "feature", "other", "value", fmt.Sprint(i))); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(fmt.Sprintf("1\x00work\x00domain-feature-set:other\x00feature\x00other\x00value\x00%d\x00\x00", n-1))
	_, published2, stored2 := sys.obs.gateway.Load().EventsRelayed()
	if published2 == published {
		t.Fatalf("no event of another process came by the fast path (%d more from the stream)", stored2-stored)
	}
	t.Logf("another process's events: %d from the subject, %d from the stream first", published2-published, stored2-stored)
}
