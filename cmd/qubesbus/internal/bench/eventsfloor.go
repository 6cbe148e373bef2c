package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"

	"github.com/qubesbus/qubesbus/bus/cloudevent"
	"github.com/qubesbus/qubesbus/services/gateway"
)

// eventsFloor is the floor of admin.Events fan-out on this machine: a bare Unix-socket
// server that answers every subscription with connection-established and, for each
// event handed to it, has one goroutine write the event's frame to every connection,
// as the gateway's hub does once it has an event, with nothing before: no NATS, no
// stream, no bookkeeping. Read by the same reader as the gateway, it says how much of
// the publish→socket latency is the machine's (a goroutine hand-off, the writes, the
// reader's wake-ups) rather than qubesbus's.
type eventsFloor struct {
	ln     *net.UnixListener
	socket string
	events chan cloudevent.Event

	mu    sync.Mutex
	conns []*net.UnixConn
	wg    sync.WaitGroup
}

// startEventsFloor listens on a socket in dir.
func startEventsFloor(dir string) (*eventsFloor, error) {
	socket := filepath.Join(dir, "events-floor.sock")
	_ = os.Remove(socket)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: socket, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("events floor: %w", err)
	}
	f := &eventsFloor{ln: ln, socket: socket, events: make(chan cloudevent.Event, 16)}
	f.wg.Add(2)
	go f.accept()
	go f.fanOut()
	return f, nil
}

var floorEstablished = gateway.AppendEvent(nil, "", "connection-established")

func (f *eventsFloor) accept() {
	defer f.wg.Done()
	for {
		c, err := f.ln.AcceptUnix()
		if err != nil {
			return // closed
		}
		// The request ends at the client's EOF, as qubesd reads it.
		if _, err := io.Copy(io.Discard, c); err != nil {
			c.Close()
			continue
		}
		// Under mu, so that no event is written before connection-established.
		f.mu.Lock()
		if _, err := c.Write(floorEstablished); err != nil {
			c.Close()
		} else {
			f.conns = append(f.conns, c)
		}
		f.mu.Unlock()
	}
}

// fanOut writes each event to every connection, in one goroutine.
func (f *eventsFloor) fanOut() {
	defer f.wg.Done()
	for ev := range f.events {
		kv := make([]string, 0, 2*len(ev.Kwargs))
		for _, p := range ev.Kwargs {
			kv = append(kv, p.Key, p.Value)
		}
		frame := gateway.AppendEvent(nil, ev.VM, ev.Name, kv...)
		f.mu.Lock()
		for _, c := range f.conns {
			_, _ = c.Write(frame) // a reader gone is the measurement's failure, seen there
		}
		f.mu.Unlock()
	}
}

// Publish hands events to the fan-out goroutine, as the tap hands the hub an event.
func (f *eventsFloor) Publish(ctx context.Context, events ...cloudevent.Event) error {
	for _, ev := range events {
		select {
		case f.events <- ev:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// disconnect closes the subscribers' connections (between fan-outs).
func (f *eventsFloor) disconnect() {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, c := range f.conns {
		c.Close()
	}
	f.conns = nil
}

func (f *eventsFloor) close() error {
	err := f.ln.Close()
	close(f.events)
	f.wg.Wait()
	f.disconnect()
	if err != nil && !errors.Is(err, net.ErrClosed) {
		return err
	}
	return nil
}
