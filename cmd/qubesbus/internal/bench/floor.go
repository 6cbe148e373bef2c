package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"path/filepath"

	"github.com/nats-io/nats.go"

	"github.com/qubesbus/qubesbus/services/gateway"
)

// NATSFloor is a bare request-reply on the same server: a responder that answers
// every request with a fixed body, and an Op that asks it.
func NATSFloor(nc, responder *nats.Conn) (Op, func(), error) {
	sub, err := responder.QueueSubscribe("qubesbus.bench.floor", "floor", func(m *nats.Msg) { _ = m.Respond([]byte("0\x00")) })
	if err != nil {
		return nil, nil, err
	}
	if err := responder.Flush(); err != nil {
		return nil, nil, err
	}
	op := func(ctx context.Context, _, _ int) error {
		_, err := nc.RequestWithContext(ctx, "qubesbus.bench.floor", []byte("admin.vm.property.Get+label dom0 name work"))
		return err
	}
	return op, func() { sub.Unsubscribe() }, nil
}

// SocketFloor is a bare Unix-socket echo server with the gateway's connection pattern
// (read to EOF, write a reply, close); the Op is Call against it.
func SocketFloor(dir string) (Op, func(), error) {
	path := filepath.Join(dir, "floor.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, nil, err
	}
	go func() {
		for {
			c, err := l.AcceptUnix()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				if _, err := io.ReadAll(c); err != nil {
					return
				}
				_, _ = c.Write([]byte("0\x00default=False type=label red"))
				_ = c.CloseWrite()
			}()
		}
	}()
	op := func(context.Context, int, int) error {
		b, err := Call(path, []byte("admin.vm.property.Get+label dom0 name work\x00"))
		if err == nil && len(b) == 0 {
			err = errors.New("empty")
		}
		return err
	}
	return op, func() { l.Close() }, nil
}

// ServeRecordedFloor is the recorded floor on its own, for clients the bench does not
// drive (tools/pybench.py, with the Python library the dom0 tools use): it records
// what the qubesbus socket from answers to the reads (RecordReads, the qvm-ls shape
// included), then answers them on socket from that table, through the gateway's own
// socket handling, until ctx ends. ready, if not nil, is called with the number of
// recorded calls once socket accepts calls. A call not recorded is aborted (an empty
// response).
func ServeRecordedFloor(ctx context.Context, socket, from string, ready func(calls int), log *slog.Logger) error {
	rec, err := RecordReads(from, true)
	if err != nil {
		return fmt.Errorf("record the reads from %s: %w", from, err)
	}
	l, err := gateway.Listen(socket, "")
	if err != nil {
		return err
	}
	s := gateway.ServeRecording(ctx, l, rec, log)
	if ready != nil {
		ready(rec.Len())
	}
	s.Wait()
	return nil
}
