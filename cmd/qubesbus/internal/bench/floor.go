package bench

import (
	"context"
	"errors"
	"io"
	"net"
	"path/filepath"

	"github.com/nats-io/nats.go"
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
