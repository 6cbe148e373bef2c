package simdriver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// A running domain's console is a real pseudo-terminal, as xenconsoled gives a Xen
// domain: its path (/dev/pts/N, what admin.vm.Console answers) is the terminal a user
// attaches to, and the simulated guest holds the other end. The guest writes a short
// boot log and a login prompt, and echoes what is typed. A console is opened the first
// time it is asked for (a lab of thousands of qubes opens none), and goes away when
// the domain stops.

// console is the guest's end of a domain's pseudo-terminal.
type console struct {
	path   string
	master *os.File
	slave  *os.File // held open so the terminal keeps its settings and output
	once   sync.Once
}

// Console implements vmlifecycle.Driver.
func (h *Hypervisor) Console(_ context.Context, name string) (string, error) {
	h.lock()
	defer h.mu.Unlock()
	d, err := h.get(name)
	if err != nil {
		return "", err
	}
	if d.console == nil {
		c, err := openConsole(name)
		if err != nil {
			return "", fmt.Errorf("console of %s: %w", name, err)
		}
		d.console = c
	}
	return d.console.path, nil
}

// openConsole opens a pseudo-terminal in raw mode and starts the guest's side of it.
func openConsole(name string) (*console, error) {
	// Non-blocking, so the file is in Go's poller and closing it ends the guest's read.
	fd, err := unix.Open("/dev/ptmx", unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("open /dev/ptmx: %w", err)
	}
	master := os.NewFile(uintptr(fd), "ptmx")
	if err := unix.IoctlSetPointerInt(fd, unix.TIOCSPTLCK, 0); err != nil {
		master.Close()
		return nil, fmt.Errorf("unlock pty: %w", err)
	}
	n, err := unix.IoctlGetUint32(fd, unix.TIOCGPTN)
	if err != nil {
		master.Close()
		return nil, fmt.Errorf("pty number: %w", err)
	}
	path := fmt.Sprintf("/dev/pts/%d", n)
	slave, err := os.OpenFile(path, os.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		master.Close()
		return nil, err
	}
	if err := makeRaw(int(slave.Fd())); err != nil {
		slave.Close()
		master.Close()
		return nil, err
	}
	c := &console{path: path, master: master, slave: slave}
	go c.guest(name)
	return c, nil
}

// makeRaw turns off the line discipline's processing (as a Xen console is: the guest
// does its own echo and line editing).
func makeRaw(fd int) error {
	t, err := unix.IoctlGetTermios(fd, unix.TCGETS)
	if err != nil {
		return fmt.Errorf("terminal settings: %w", err)
	}
	t.Iflag &^= unix.IGNBRK | unix.BRKINT | unix.PARMRK | unix.ISTRIP | unix.INLCR | unix.IGNCR | unix.ICRNL | unix.IXON
	t.Oflag &^= unix.OPOST
	t.Lflag &^= unix.ECHO | unix.ECHONL | unix.ICANON | unix.ISIG | unix.IEXTEN
	t.Cflag &^= unix.CSIZE | unix.PARENB
	t.Cflag |= unix.CS8
	t.Cc[unix.VMIN], t.Cc[unix.VTIME] = 1, 0
	if err := unix.IoctlSetTermios(fd, unix.TCSETS, t); err != nil {
		return fmt.Errorf("raw terminal: %w", err)
	}
	return nil
}

// bootLog is what the simulated guest prints when its console is first attached.
func bootLog(name string) string {
	return strings.Join([]string{
		"[    0.000000] Linux version 6.12.40-1.qubes.fc41.x86_64 (qubesbus simulated guest)",
		"[    0.412345] xen: console ready",
		"[    1.234567] systemd[1]: Hostname set to <" + name + ">.",
		"[    2.345678] systemd[1]: Reached target multi-user.target.",
		"",
		"Fedora Linux 41 (Qubes simulated guest)",
		"Kernel 6.12.40-1.qubes.fc41.x86_64 on x86_64 (hvc0)",
		"",
		name + " login: ",
	}, "\r\n")
}

// guest writes the boot log, then echoes every byte typed; a finished line gets a new
// login prompt. It ends when the console is closed.
func (c *console) guest(name string) {
	if _, err := io.WriteString(c.master, bootLog(name)); err != nil {
		return
	}
	buf := make([]byte, 256)
	for {
		n, err := c.master.Read(buf)
		if err != nil {
			return // closed: the domain stopped
		}
		var out []byte
		for _, b := range buf[:n] {
			switch b {
			case '\r', '\n':
				out = append(out, "\r\n"+name+" login: "...)
			default:
				out = append(out, b)
			}
		}
		if _, err := c.master.Write(out); err != nil && !errors.Is(err, os.ErrClosed) {
			return
		}
	}
}

// close removes the terminal: its path is freed, and a user attached to it reads the
// end of it.
func (c *console) close() {
	c.once.Do(func() {
		c.slave.Close()
		c.master.Close()
	})
}
