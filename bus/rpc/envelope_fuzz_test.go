package rpc

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/bus/envelope"
	"github.com/qubesbus/qubesbus/bus/qerr"
	"github.com/qubesbus/qubesbus/bus/subject"
)

// rawClient speaks the NATS client protocol itself, so that it can send what nats.go
// never would: any header block, any payload.
type rawClient struct {
	c   net.Conn
	r   *bufio.Reader
	seq int
}

func dialRaw(ns *server.Server) (*rawClient, error) {
	c, err := net.DialTimeout("tcp", ns.Addr().String(), 5*time.Second)
	if err != nil {
		return nil, err
	}
	rc := &rawClient{c: c, r: bufio.NewReader(c)}
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if line, err := rc.r.ReadString('\n'); err != nil || !strings.HasPrefix(line, "INFO ") {
		c.Close()
		return nil, fmt.Errorf("no INFO: %q %v", line, err)
	}
	if _, err := io.WriteString(c, "CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true,\"no_responders\":true,\"protocol\":1}\r\nSUB _RAW.> 1\r\nPING\r\n"); err != nil {
		c.Close()
		return nil, err
	}
	if _, err := rc.next(); err != nil {
		c.Close()
		return nil, err
	}
	return rc, nil
}

var errRefused = errors.New("server refused the message")

// next reads protocol lines until a message or a PONG; it answers PINGs. A message
// comes back as its header and payload; a PONG as nil.
func (rc *rawClient) next() (*nats.Msg, error) {
	for {
		line, err := rc.r.ReadString('\n')
		if err != nil {
			return nil, err
		}
		line = strings.TrimRight(line, "\r\n")
		switch {
		case line == "PONG":
			return nil, nil
		case line == "PING":
			if _, err := io.WriteString(rc.c, "PONG\r\n"); err != nil {
				return nil, err
			}
		case strings.HasPrefix(line, "-ERR"):
			return nil, fmt.Errorf("%w: %s", errRefused, line)
		case strings.HasPrefix(line, "HMSG ") || strings.HasPrefix(line, "MSG "):
			f := strings.Fields(line)
			hdr := 0
			total, err := strconv.Atoi(f[len(f)-1])
			if err != nil {
				return nil, fmt.Errorf("bad line %q", line)
			}
			if f[0] == "HMSG" {
				if hdr, err = strconv.Atoi(f[len(f)-2]); err != nil {
					return nil, fmt.Errorf("bad line %q", line)
				}
			}
			buf := make([]byte, total+2)
			if _, err := io.ReadFull(rc.r, buf); err != nil {
				return nil, err
			}
			m := &nats.Msg{Subject: f[1], Data: buf[hdr:total]}
			if hdr > 0 {
				if m.Header, err = nats.DecodeHeadersMsg(buf[:hdr]); err != nil {
					return nil, fmt.Errorf("reply with bad headers %q: %w", buf[:hdr], err)
				}
			}
			return m, nil
		}
	}
}

// request publishes a raw header block and payload on subj and returns the reply.
func (rc *rawClient) request(subj, hdr string, payload []byte) (*nats.Msg, error) {
	rc.seq++
	reply := "_RAW." + strconv.Itoa(rc.seq)
	var b strings.Builder
	if hdr == "" {
		fmt.Fprintf(&b, "PUB %s %s %d\r\n", subj, reply, len(payload))
	} else {
		fmt.Fprintf(&b, "HPUB %s %s %d %d\r\n%s", subj, reply, len(hdr), len(hdr)+len(payload), hdr)
	}
	b.Write(payload)
	b.WriteString("\r\n")
	_ = rc.c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(rc.c, b.String()); err != nil {
		return nil, err
	}
	for {
		m, err := rc.next()
		if err != nil || m == nil || m.Subject == reply {
			return m, err
		}
	}
}

// FuzzServiceEnvelope is a permitted but broken client (it may publish on the API
// subjects) sending any header block and payload to a service: the mux answers every
// message with an envelope (ok, exception or abort), never panics, and keeps serving.
func FuzzServiceEnvelope(f *testing.F) {
	ns := bustest.RunJetStream(f)
	nc := bustest.Connect(f, ns)
	host := subject.ForHost("t")
	reg := NewRegistry(
		Method{Name: "admin.vm.List", Service: Properties, Arg: Forbidden, Payload: Forbidden},
		Method{Name: "admin.vm.feature.Set", Service: Properties, Arg: Required, ChangesConfig: true, Access: Write},
		Method{Name: "admin.label.Create", Service: Properties, Arg: Required, Payload: Required, Dest: AdminVMDest, ChangesConfig: true, Access: Write},
		Method{Name: "admin.vm.Stats", Service: Properties, Arg: Forbidden, Payload: Forbidden, Cancellable: true},
		Method{Name: "admin.Events", Service: Gateway, Arg: Forbidden, Payload: Forbidden, Cancellable: true},
	)
	res := qubes{
		"dom0": {Name: "dom0", Class: "AdminVM", UUID: "00000000-0000-0000-0000-000000000000"},
		"work": {Name: "work", Class: "AppVM", UUID: "e443df78-9558-467f-9ba9-1faf7a024204"},
	}
	mux := NewMux(reg, Properties, res, slog.New(slog.DiscardHandler))
	mux.HandleUnknown()
	mux.Handle("admin.vm.List", func(_ context.Context, c *Call) ([]byte, error) { return []byte(c.Dest.Name), nil })
	mux.Handle("admin.vm.feature.Set", func(_ context.Context, c *Call) ([]byte, error) {
		if strings.HasPrefix(c.Arg, "x") {
			return nil, qerr.QubesException("feature " + c.Arg)
		}
		return append([]byte(c.Arg), c.Payload...), nil
	})
	mux.Handle("admin.label.Create", func(context.Context, *Call) ([]byte, error) {
		return nil, fmt.Errorf("%w: not a Qubes error", qerr.ErrAbort)
	})
	mux.Handle("admin.vm.Stats", func(context.Context, *Call) ([]byte, error) { return nil, nil })
	ctx, cancel := context.WithCancel(context.Background())
	f.Cleanup(cancel)
	svc, err := mux.Serve(ctx, nc, host)
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { _ = svc.Stop() })
	subjects := []string{host.API("admin.vm.List"), host.API("admin.vm.feature.Set"), host.API("admin.label.Create"),
		host.API("admin.vm.Stats"), host.API("admin.Events"), host.API(subject.UnknownMethod)}
	good := &envelope.Request{Method: "admin.vm.List", Source: "dom0", Dest: "work"}
	client := bustest.Connect(f, ns)

	var rc *rawClient
	f.Cleanup(func() {
		if rc != nil {
			rc.c.Close()
		}
	})
	header := func(kv ...string) string {
		var b strings.Builder
		b.WriteString("NATS/1.0\r\n")
		for i := 0; i+1 < len(kv); i += 2 {
			b.WriteString(kv[i] + ": " + kv[i+1] + "\r\n")
		}
		b.WriteString("\r\n")
		return b.String()
	}
	f.Add(uint8(0), header("Qubes-Method", "admin.vm.List", "Qubes-Source", "dom0", "Qubes-Dest", "work"), []byte{})
	f.Add(uint8(1), header("Qubes-Method", "admin.vm.feature.Set", "Qubes-Source", "dom0", "Qubes-Dest", "work", "Qubes-Arg", "a%2Eb"), []byte("1"))
	f.Add(uint8(1), header("Qubes-Method", "admin.vm.feature.Set", "Qubes-Source", "dom0", "Qubes-Dest", "work", "Qubes-Arg", strings.Repeat("x", 60<<10)), []byte("1"))
	f.Add(uint8(2), header("Qubes-Method", "admin.label.Create", "Qubes-Source", "dom0", "Qubes-Dest", "dom0", "Qubes-Arg", "red"), []byte("0xff0000"))
	f.Add(uint8(3), header("Qubes-Method", "admin.vm.Stats", "Qubes-Source", "dom0", "Qubes-Dest", "work", "Qubes-Request-Id", strings.Repeat("i", 300)), []byte{})
	f.Add(uint8(4), header("Qubes-Method", "admin.Events", "Qubes-Source", "dom0", "Qubes-Dest", "dom0"), []byte{})
	f.Add(uint8(5), header("Qubes-Method", strings.Repeat("admin.nope.", 500), "Qubes-Source", "dom0", "Qubes-Dest", "dom0"), []byte{})
	f.Add(uint8(0), header("Qubes-Method", "%zz", "Qubes-Source", "%4", "Qubes-Config-Rev", "-1", "Qubes-Runtime", "x.y"), []byte{0})
	f.Add(uint8(1), "NATS/1.0 503\r\n\r\n", []byte{})
	f.Add(uint8(1), "garbage", []byte("payload"))
	f.Add(uint8(0), "", []byte("no headers at all"))
	f.Add(uint8(0), "NATS/1.0\r\nQubes-Method\r\n: \r\n\r\n", []byte{})
	f.Fuzz(func(t *testing.T, which uint8, hdr string, payload []byte) {
		if rc == nil {
			if rc, err = dialRaw(ns); err != nil {
				t.Fatal(err)
			}
		}
		subj := subjects[int(which)%len(subjects)]
		m, err := rc.request(subj, hdr, payload)
		switch {
		case errors.Is(err, errRefused) || (err != nil && hdr != "" && !strings.HasPrefix(hdr, "NATS/1.0")):
			// The server itself refused the message (and closed the connection): it
			// never reached the service. Start over on a new connection.
			t.Logf("refused by the server: %v", err)
			rc.c.Close()
			rc = nil
		case err != nil:
			t.Fatalf("no reply to %q %q: %v", hdr, payload, err)
		default:
			switch st := m.Header.Get(envelope.HeaderStatus); st {
			case envelope.StatusOK, envelope.StatusException, envelope.StatusAbort, envelope.StatusBehind:
				t.Logf("%s: %s %s %.80q", subj, st, m.Header.Get(envelope.HeaderException), m.Data)
			default:
				t.Fatalf("reply to %q %q: status %q, headers %v", hdr, payload, st, m.Header)
			}
		}
		// The service still answers a well-formed call.
		rctx, rcancel := context.WithTimeout(ctx, 10*time.Second)
		defer rcancel()
		rep, err := client.RequestMsgWithContext(rctx, good.Msg(host.API(good.Method)))
		if err != nil {
			t.Fatalf("service stopped answering after %q %q: %v", hdr, payload, err)
		}
		if r, err := envelope.ParseReply(rep); err != nil || r.Status != envelope.StatusOK || string(r.Content) != "work" {
			t.Fatalf("after %q %q: reply %+v %v", hdr, payload, r, err)
		}
	})
}
