package bus

import (
	"bytes"
	"net"
	"sync"

	"github.com/nats-io/nats.go"
)

// MaxControlLine is the longest client protocol line ("PUB <subject> <reply> <size>",
// "SUB <subject> <sid>") a connection sends: nats-server's default max_control_line.
//
// A server answers a longer line with "-ERR 'Maximum Control Line Exceeded'" and
// closes the connection, and nats.go then closes the connection for good: unlike a
// lost connection it is not reconnected, whatever MaxReconnects says, so a service
// would stop answering until restarted. Subjects are bounded where they are built
// (bus/subject), so no qubesbus line comes near this; should one anyway, the guard
// below makes it cost that one message, not the connection. (A server configured with
// a larger max_control_line still gets no line over this one.)
const MaxControlLine = 4096

// lineGuard is a client connection to NATS that drops a message (its line and its
// payload) whose control line is longer than max, instead of sending it; the drop is
// reported to onDrop. It reads the client protocol only while the connection speaks
// it in the clear: a connection whose first bytes are not a CONNECT (TLS, websocket)
// is passed through unchanged.
type lineGuard struct {
	net.Conn
	max    int
	onDrop func(op string, line []byte, size int)

	mu    sync.Mutex
	state int
	line  []byte // the control line so far (or its start, while dropping)
	tail  []byte // the end of a line being dropped, where its sizes are
	skip  int    // payload bytes (with their CRLF) still to pass or drop
	drop  bool   // the payload in progress is dropped
	out   []byte
}

const (
	guardStart   = iota // nothing written yet
	guardLine           // reading a control line
	guardPayload        // passing or dropping a payload
	guardDrop           // dropping a control line that is too long
	guardPass           // not the plain client protocol: pass everything
)

func newLineGuard(c net.Conn, max int, onDrop func(op string, line []byte, size int)) *lineGuard {
	return &lineGuard{Conn: c, max: max, onDrop: onDrop}
}

// Write sends p, less any message whose control line is too long. It reports all of
// p written unless the connection fails.
func (g *lineGuard) Write(p []byte) (int, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.state == guardStart && len(p) > 0 {
		g.state = guardPass
		if p[0] == 'C' || p[0] == 'c' {
			g.state = guardLine
		}
	}
	if g.state == guardPass {
		return g.Conn.Write(p)
	}
	// Most writes are whole messages: then p goes out as it is, without a copy. Once
	// something is held back or dropped, what is sent is collected in out.
	clean := len(g.line) == 0
	g.out = g.out[:0]
	rest := p
	dirty := func() {
		if clean {
			g.out = append(g.out, p[:len(p)-len(rest)]...)
			clean = false
		}
	}
	for len(rest) > 0 {
		switch g.state {
		case guardPayload:
			n := min(g.skip, len(rest))
			if g.drop {
				dirty()
			} else if !clean {
				g.out = append(g.out, rest[:n]...)
			}
			rest = rest[n:]
			if g.skip -= n; g.skip == 0 {
				g.state, g.drop = guardLine, false
			}
		case guardLine:
			i := bytes.IndexByte(rest, '\n')
			n := len(rest)
			if i >= 0 {
				n = i + 1
			}
			if len(g.line)+n > g.max && !g.isConnect(rest[:n]) {
				// Too long: keep its start (the operation) and look for its end.
				dirty()
				g.line = append(g.line, rest[:min(n, 16)]...)
				g.tail = g.tail[:0]
				g.state = guardDrop
				continue
			}
			if i < 0 {
				// A line cut between two writes waits for its end.
				dirty()
				g.line = append(g.line, rest...)
				rest = nil
				continue
			}
			line := rest[:n]
			if len(g.line) > 0 {
				g.line = append(g.line, line...)
				line = g.line
			}
			if !clean {
				g.out = append(g.out, line...)
			}
			g.skip = payloadSize(line)
			g.line = g.line[:0]
			rest = rest[n:]
			if g.skip > 0 {
				g.state = guardPayload
			}
		case guardDrop:
			i := bytes.IndexByte(rest, '\n')
			n := len(rest)
			if i >= 0 {
				n = i + 1
			}
			g.tail = append(g.tail, rest[:n]...)
			if len(g.tail) > 64 {
				g.tail = append(g.tail[:0], g.tail[len(g.tail)-64:]...)
			}
			rest = rest[n:]
			if i < 0 {
				continue
			}
			op := opOf(g.line)
			size := -1
			if hasOp(g.line, "PUB") || hasOp(g.line, "HPUB") {
				size = lastNumber(g.tail)
			}
			if g.onDrop != nil {
				g.onDrop(op, g.line[:min(len(g.line), 32)], size)
			}
			g.line, g.tail = g.line[:0], g.tail[:0]
			g.state = guardLine
			if size >= 0 {
				g.skip, g.drop, g.state = size+2, true, guardPayload
			}
		}
	}
	out := p
	if !clean {
		out = g.out
	}
	if cap(g.out) > 1<<20 {
		g.out = nil // a large message went through the copy: do not keep its buffer
	}
	if len(out) > 0 {
		if _, err := g.Conn.Write(out); err != nil {
			return 0, err
		}
	}
	return len(p), nil
}

// isConnect reports whether the line being read (held, then next) is a CONNECT, which
// carries credentials, is not bounded like the others, and is what nats.go writes
// first.
func (g *lineGuard) isConnect(next []byte) bool {
	const op = "CONNECT "
	start := append(g.line[:len(g.line):len(g.line)], next[:min(len(next), len(op))]...)
	return len(start) >= len(op) && string(bytes.ToUpper(start[:len(op)])) == op
}

// payloadSize is how many bytes follow a control line: the payload and its CRLF for
// PUB and HPUB, none for the others. (On every message: no allocation.)
func payloadSize(line []byte) int {
	if hasOp(line, "PUB") || hasOp(line, "HPUB") {
		if n := lastNumber(line); n >= 0 {
			return n + 2
		}
	}
	return 0
}

// hasOp reports whether line starts with the operation op (upper case), in any case.
func hasOp(line []byte, op string) bool {
	if len(line) <= len(op) {
		return false
	}
	for i := 0; i < len(op); i++ {
		c := line[i]
		if 'a' <= c && c <= 'z' {
			c -= 'a' - 'A'
		}
		if c != op[i] {
			return false
		}
	}
	return line[len(op)] == ' ' || line[len(op)] == '\t'
}

// opOf is the protocol operation a line starts with, upper case.
func opOf(line []byte) string {
	i := bytes.IndexAny(line, " \t\r\n")
	if i < 0 {
		i = len(line)
	}
	return string(bytes.ToUpper(line[:i]))
}

// lastNumber is the last field of a control line (the total size of PUB and HPUB),
// or -1.
func lastNumber(line []byte) int {
	i := len(line)
	for i > 0 && (line[i-1] == '\r' || line[i-1] == '\n' || line[i-1] == ' ' || line[i-1] == '\t') {
		i--
	}
	j := i
	for j > 0 && '0' <= line[j-1] && line[j-1] <= '9' {
		j--
	}
	if j == i || i-j > 18 || j == 0 || (line[j-1] != ' ' && line[j-1] != '\t') {
		return -1
	}
	n := 0
	for _, c := range line[j:i] {
		n = n*10 + int(c-'0')
	}
	return n
}

// guardedProvider hands out guarded in-process connections.
type guardedProvider struct {
	p      nats.InProcessConnProvider
	onDrop func(op string, line []byte, size int)
}

func (g guardedProvider) InProcessConn() (net.Conn, error) {
	c, err := g.p.InProcessConn()
	if err != nil {
		return nil, err
	}
	return newLineGuard(c, MaxControlLine, g.onDrop), nil
}
