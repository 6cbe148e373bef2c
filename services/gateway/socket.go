package gateway

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// ErrSocketInUse is returned when a live daemon already answers on the socket path.
var ErrSocketInUse = errors.New("socket already in use")

// Listen opens the Unix socket at path with mode 0660 (and group, if not empty). A
// stale socket left by a dead daemon is removed; a live one makes Listen fail.
func Listen(path, group string) (*net.UnixListener, error) {
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("%s exists and is not a socket; not removing it", path)
		}
		c, err := net.DialTimeout("unix", path, time.Second)
		if err == nil {
			c.Close()
			return nil, fmt.Errorf("%w: socket already exists: '%s'", ErrSocketInUse, path)
		}
		if !errors.Is(err, syscall.ECONNREFUSED) {
			return nil, fmt.Errorf("probe existing socket %s: %w", path, err)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("remove stale socket: %w", err)
		}
	}
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", path, err)
	}
	// Closing the listener must not remove a socket that a newer daemon now owns.
	l.SetUnlinkOnClose(true)
	if err := os.Chmod(path, 0o660); err != nil {
		l.Close()
		return nil, fmt.Errorf("chmod socket: %w", err)
	}
	if group != "" {
		g, err := user.LookupGroup(group)
		if err != nil {
			l.Close()
			return nil, fmt.Errorf("socket group: %w", err)
		}
		gid, _ := strconv.Atoi(g.Gid)
		if err := os.Chown(path, -1, gid); err != nil {
			l.Close()
			return nil, fmt.Errorf("chown socket: %w", err)
		}
	}
	return l, nil
}

// socketCheckInterval is how often the gateway checks that its socket is still at its
// path.
var socketCheckInterval = time.Second

// heldSocket holds the file of a socket the gateway listens on, by an O_PATH
// descriptor: while it is held no other file can have its device and inode numbers,
// so comparing them with the file at the path tells whether the path still names it
// (a socket deleted and another created at once may get the inode number of one no
// longer held).
type heldSocket struct {
	fd       int
	dev, ino uint64
}

func holdSocket(path string) (*heldSocket, error) {
	fd, err := unix.Open(path, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return nil, &os.PathError{Op: "fstat", Path: path, Err: err}
	}
	return &heldSocket{fd: fd, dev: uint64(st.Dev), ino: uint64(st.Ino)}, nil
}

// at reports whether path names the held file, or why not.
func (h *heldSocket) at(path string) (bool, error) {
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return false, &os.PathError{Op: "lstat", Path: path, Err: err}
	}
	return uint64(st.Dev) == h.dev && uint64(st.Ino) == h.ino, nil
}

func (h *heldSocket) release() {
	if h != nil {
		unix.Close(h.fd)
	}
}

// keepSocket keeps a socket at path until ctx ends. l listens there now, its file
// held by held (taken over: keepSocket releases it). Whenever the file at path is not
// l's any more (deleted, or replaced), l is closed without removing what is at path,
// and a fresh socket is opened at path with Listen (same group, same mode; a stale
// socket there is removed) and handed to serve; calls accepted on l go on. If another
// live daemon now answers at path, the path is its: keepSocket logs so and stops. It
// checks every socketCheckInterval: a deleted socket is back within about that long.
func keepSocket(ctx context.Context, path, group string, l *net.UnixListener, held *heldSocket, log *slog.Logger, serve func(*net.UnixListener)) {
	defer func() { held.release() }()
	t := time.NewTicker(socketCheckInterval)
	defer t.Stop()
	lastErr := ""
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if ctx.Err() != nil { // the accept loop closes l (and removes the socket)
			return
		}
		if l != nil {
			ours, err := false, error(nil)
			if held != nil {
				ours, err = held.at(path)
			}
			if ours {
				continue
			}
			// Not ours any more: closing l must not remove what is there now.
			l.SetUnlinkOnClose(false)
			l.Close()
			l = nil
			held.release()
			held = nil
			if err != nil {
				log.Warn("gateway socket gone; listening again", "socket", path, "err", err)
			} else {
				log.Warn("gateway socket replaced; listening again", "socket", path)
			}
		}
		nl, err := listenAgain(path, group)
		if errors.Is(err, ErrSocketInUse) {
			log.Error("gateway socket taken by another process; no longer listening", "socket", path)
			return
		}
		if err != nil {
			if err.Error() != lastErr { // once per cause, not every second
				log.Error("gateway socket: cannot listen again; retrying", "socket", path, "err", err)
				lastErr = err.Error()
			}
			continue
		}
		// Not held (gone again at once): the next check opens another.
		held, _ = holdSocket(path)
		l, lastErr = nl, ""
		log.Info("gateway socket ready again", "socket", path)
		serve(l)
	}
}

// listenAgain is Listen, first creating the socket's directory if it went too.
func listenAgain(path, group string) (*net.UnixListener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("socket dir: %w", err)
	}
	return Listen(path, group)
}
