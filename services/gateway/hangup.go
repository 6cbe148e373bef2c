package gateway

import (
	"context"
	"net"
	"time"

	"golang.org/x/sys/unix"
)

// hangupPoll is how often an idle stream checks whether its client is still there.
const hangupPoll = 200 * time.Millisecond

// watchHangup cancels when the client closes its end of the socket.
//
// A client half-closes (SHUT_WR) after its request, so reads return EOF at once and
// cannot tell "done sending" from "gone". A Unix socket reports POLLHUP only once both
// directions are shut, i.e. when the peer closed the socket entirely; a non-blocking
// poll for it on a timer needs no extra thread per client.
func watchHangup(ctx context.Context, c *net.UnixConn, cancel context.CancelFunc) {
	rc, err := c.SyscallConn()
	if err != nil {
		cancel()
		return
	}
	t := time.NewTicker(hangupPoll)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		gone := false
		cerr := rc.Control(func(fd uintptr) {
			fds := []unix.PollFd{{Fd: int32(fd), Events: 0}}
			n, err := unix.Poll(fds, 0)
			gone = err == nil && n > 0 && fds[0].Revents&(unix.POLLHUP|unix.POLLERR|unix.POLLNVAL) != 0
		})
		if cerr != nil || gone {
			cancel()
			return
		}
	}
}
