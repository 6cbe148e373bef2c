package bus

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/qubesbus/qubesbus/bus/embedded"
)

// sink is a net.Conn that records what is written to it.
type sink struct {
	net.Conn
	buf bytes.Buffer
}

func (s *sink) Write(p []byte) (int, error) { return s.buf.Write(p) }

// protocolStream is a client protocol session and what a guard must send of it.
func protocolStream(r *rand.Rand) (in, want []byte, drops int) {
	var inb, wantb bytes.Buffer
	add := func(s string, keep bool) {
		inb.WriteString(s)
		if keep {
			wantb.WriteString(s)
		} else {
			drops++
		}
	}
	add(`CONNECT {"jwt":"`+strings.Repeat("j", 5000)+`","headers":true}`+"\r\nPING\r\n", true)
	for i := range 200 {
		subj := "qubes.v1.local.events.work." + strings.Repeat("s", r.IntN(40))
		if r.IntN(8) == 0 {
			subj += strings.Repeat("L", MaxControlLine) // too long
		}
		long := len(subj) > MaxControlLine-64
		payload := strings.Repeat("PUB x 1\r\n", r.IntN(30)) // protocol-looking bytes inside a payload
		switch r.IntN(5) {
		case 0:
			add(fmt.Sprintf("PUB %s _INBOX.abc %d\r\n%s\r\n", subj, len(payload), payload), !long)
		case 1:
			hdr := "NATS/1.0\r\nCe-Type: " + strings.Repeat("h", r.IntN(6000)) + "\r\n\r\n"
			add(fmt.Sprintf("HPUB %s %d %d\r\n%s%s\r\n", subj, len(hdr), len(hdr)+len(payload), hdr, payload), !long)
		case 2:
			add(fmt.Sprintf("SUB %s %d\r\n", subj, i), !long)
		case 3:
			add(fmt.Sprintf("UNSUB %d\r\n", i), true)
		default:
			add("PING\r\n", true)
		}
	}
	return inb.Bytes(), wantb.Bytes(), drops
}

func TestLineGuardDropsOnlyOverlongMessages(t *testing.T) {
	for seed := range uint64(50) {
		r := rand.New(rand.NewPCG(seed, 1))
		in, want, drops := protocolStream(r)
		s := &sink{}
		dropped := 0
		g := newLineGuard(s, MaxControlLine, func(op string, line []byte, size int) {
			dropped++
			if (op != "PUB" && op != "HPUB" && op != "SUB") || (op != "SUB" && size < 0) {
				t.Errorf("dropped %s %q, size %d", op, line, size)
			}
		})
		// Written in pieces cut anywhere, as a buffered writer flushes.
		for rest := in; len(rest) > 0; {
			n := min(len(rest), 1+r.IntN(1<<uint(r.IntN(15))))
			if w, err := g.Write(rest[:n]); w != n || err != nil {
				t.Fatalf("Write = %d, %v", w, err)
			}
			rest = rest[n:]
		}
		if !bytes.Equal(s.buf.Bytes(), want) {
			t.Fatalf("seed %d: sent %d bytes, want %d", seed, s.buf.Len(), len(want))
		}
		if dropped != drops {
			t.Fatalf("seed %d: %d drops reported, want %d", seed, dropped, drops)
		}
	}
}

func TestLineGuardPassesOtherProtocols(t *testing.T) {
	for _, first := range []string{"\x16\x03\x01", "GET / HTTP/1.1\r\n"} { // TLS, websocket
		s := &sink{}
		g := newLineGuard(s, 8, nil)
		in := first + "PUB " + strings.Repeat("x", 100) + " 0\r\n\r\n"
		for i := 0; i < len(in); i += 7 {
			_, _ = g.Write([]byte(in[i:min(i+7, len(in))]))
		}
		if s.buf.String() != in {
			t.Fatalf("%q: changed to %q", first, s.buf.String())
		}
	}
}

// A connection the server drops is reconnected, and its subscriptions with it.
func TestConnectionReconnectsAndResubscribes(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	ns, err := embedded.Start(ctx, embedded.Config{StoreDir: t.TempDir(), Port: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Shutdown()
	for _, cc := range []ConnConfig{{URL: ns.ClientURL(), Name: "tcp"}, {InProcess: ns, Name: "in-process"}} {
		nc, err := Connect(ctx, cc, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		sub, err := nc.Subscribe("echo", func(m *nats.Msg) { _ = m.Respond(m.Data) })
		if err != nil {
			t.Fatal(err)
		}
		defer sub.Unsubscribe()
		client, err := Connect(ctx, ConnConfig{URL: ns.ClientURL(), Name: "client"}, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		defer client.Close()
		if err := nc.Flush(); err != nil {
			t.Fatal(err)
		}
		cid, err := nc.GetClientID()
		if err != nil {
			t.Fatal(err)
		}
		if err := ns.DisconnectClientByID(cid); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(10 * time.Second)
		for {
			if _, err := client.Request("echo", []byte("hi"), 200*time.Millisecond); err == nil && nc.Stats().Reconnects > 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: not answering after the server dropped it: status %v, %d reconnects", cc.Name, nc.Status(), nc.Stats().Reconnects)
			}
		}
	}
}

func BenchmarkLineGuard(b *testing.B) {
	msg := []byte("HPUB qubes.v1.local.events.work.property-set.netvm _INBOX.abcdefgh.1 120 180\r\n" +
		"NATS/1.0\r\n" + strings.Repeat("h", 106) + "\r\n\r\n" + strings.Repeat("d", 60) + "\r\n")
	buf := bytes.Repeat(msg, 100)
	g := newLineGuard(&sink{}, MaxControlLine, nil)
	_, _ = g.Write([]byte("CONNECT {}\r\n"))
	b.SetBytes(int64(len(buf)))
	b.ReportAllocs()
	for b.Loop() {
		g.Conn.(*sink).buf.Reset()
		_, _ = g.Write(buf)
	}
}
