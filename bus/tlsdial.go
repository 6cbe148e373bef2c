package bus

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"
)

// guardedDialer dials TCP connections to NATS whose client protocol passes the line
// guard, TLS or not. nats.go would wrap a connection in TLS itself, below any guard a
// dialer can give it; so this dialer tells it not to (SkipTLSHandshake) and starts TLS
// on its own, where nats.go would: after the server's INFO, before the client's first
// byte, when the configuration asks for TLS or the INFO requires it.
type guardedDialer struct {
	timeout time.Duration
	onDrop  func(op string, line []byte, size int)
	// tls is the configuration of the handshakes (roots, client certificate);
	// ServerName is set per connection. want: TLS whatever the server says.
	tls  *tls.Config
	want bool
	// names are the host names of the configured URLs: a server found by gossip is
	// dialled by address, and its certificate checked against the name the
	// configuration gave, as nats.go does.
	names []string
	// ws: websocket URLs, which nats.go frames (and secures, for wss) itself; the
	// guard passes their bytes unread, as any protocol but the plain one.
	ws bool
}

func newGuardedDialer(timeout time.Duration, urls string, files TLSFiles, onDrop func(op string, line []byte, size int)) (*guardedDialer, error) {
	d := &guardedDialer{timeout: timeout, onDrop: onDrop, want: files.enabled(), tls: &tls.Config{MinVersion: tls.VersionTLS12}}
	for _, u := range strings.Split(urls, ",") {
		p, err := url.Parse(strings.TrimSpace(u))
		if err != nil || p.Hostname() == "" {
			continue
		}
		switch p.Scheme {
		case "tls":
			d.want = true
		case "ws", "wss":
			d.ws = true
		}
		if net.ParseIP(p.Hostname()) == nil {
			d.names = append(d.names, p.Hostname())
		}
	}
	if files.CA != "" {
		pem, err := os.ReadFile(files.CA)
		if err != nil {
			return nil, fmt.Errorf("nats TLS CA: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("nats TLS CA %s: no certificate in it", files.CA)
		}
		d.tls.RootCAs = pool
	}
	if files.Cert != "" {
		cert, err := tls.LoadX509KeyPair(files.Cert, files.Key)
		if err != nil {
			return nil, fmt.Errorf("nats TLS client certificate: %w", err)
		}
		d.tls.Certificates = []tls.Certificate{cert}
	}
	return d, nil
}

// SkipTLSHandshake tells nats.go that the connection does its own TLS.
func (d *guardedDialer) SkipTLSHandshake() bool { return !d.ws }

func (d *guardedDialer) Dial(network, address string) (net.Conn, error) {
	c, err := (&net.Dialer{Timeout: d.timeout}).Dial(network, address)
	if err != nil {
		return nil, err
	}
	host, _, err := net.SplitHostPort(address)
	if err != nil {
		host = address
	}
	if net.ParseIP(host) != nil && len(d.names) > 0 {
		host = d.names[0]
	}
	cfg := d.tls.Clone()
	cfg.ServerName = host
	return &upgradingConn{raw: c, conn: c, d: d, tls: cfg}, nil
}

// upgradingConn is a client connection to NATS that reads the server's INFO in the
// clear, then, at the client's first write, starts TLS if it is wanted or required,
// and sends everything through the line guard above it. nats.go reads the INFO before
// it writes, and reads nothing while it writes the first bytes.
type upgradingConn struct {
	raw net.Conn
	d   *guardedDialer
	tls *tls.Config

	mu    sync.Mutex
	conn  net.Conn   // the connection in use: raw, then TLS if started
	info  []byte     // the server's INFO line, read so far (up to its end)
	guard *lineGuard // nil until the first write
}

// maxInfo bounds the INFO line kept to decide on TLS; nats-server's is about 1 KiB.
const maxInfo = 64 << 10

func (c *upgradingConn) current() (net.Conn, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.conn, c.guard != nil
}

func (c *upgradingConn) Read(p []byte) (int, error) {
	conn, started := c.current()
	n, err := conn.Read(p)
	if !started {
		c.mu.Lock()
		if !bytes.Contains(c.info, []byte("\n")) && len(c.info) < maxInfo {
			c.info = append(c.info, p[:n]...)
		}
		c.mu.Unlock()
	}
	return n, err
}

func (c *upgradingConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	if c.guard == nil {
		if err := c.start(); err != nil {
			c.mu.Unlock()
			return 0, err
		}
	}
	g := c.guard
	c.mu.Unlock()
	return g.Write(p)
}

func (c *upgradingConn) Close() error {
	conn, _ := c.current()
	return conn.Close()
}

func (c *upgradingConn) LocalAddr() net.Addr  { return c.raw.LocalAddr() }
func (c *upgradingConn) RemoteAddr() net.Addr { return c.raw.RemoteAddr() }

// The deadlines are the raw connection's, which TLS uses as they are.
func (c *upgradingConn) SetDeadline(t time.Time) error      { return c.raw.SetDeadline(t) }
func (c *upgradingConn) SetReadDeadline(t time.Time) error  { return c.raw.SetReadDeadline(t) }
func (c *upgradingConn) SetWriteDeadline(t time.Time) error { return c.raw.SetWriteDeadline(t) }

// start begins TLS when wanted or required by the INFO read, and puts the guard on
// the connection in use.
func (c *upgradingConn) start() error {
	line, _, _ := bytes.Cut(c.info, []byte("\n"))
	var info struct {
		TLSRequired bool `json:"tls_required"`
	}
	if rest, ok := bytes.CutPrefix(bytes.TrimSpace(line), []byte("INFO")); ok {
		_ = json.Unmarshal(bytes.TrimSpace(rest), &info) // nats.go judges the INFO itself
	}
	if !c.d.ws && (c.d.want || info.TLSRequired) {
		tc := tls.Client(c.raw, c.tls)
		ctx, cancel := context.WithTimeout(context.Background(), c.d.timeout)
		defer cancel()
		if err := tc.HandshakeContext(ctx); err != nil {
			return fmt.Errorf("%w: %w", errTLSHandshake, err)
		}
		c.conn = tc
	}
	c.guard = newLineGuard(c.conn, MaxControlLine, c.d.onDrop)
	c.info = nil
	return nil
}

var errTLSHandshake = errors.New("nats: TLS handshake")
