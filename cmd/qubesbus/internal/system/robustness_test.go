package system

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"runtime"
	"syscall"
	"testing"
	"time"

	"github.com/qubesbus/qubesbus/bus/bustest"
)

const listAll = "admin.vm.List+ dom0 name dom0\x00"

func raiseFileLimit(t *testing.T, want uint64) {
	t.Helper()
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	if lim.Cur >= want {
		return
	}
	lim.Cur = min(want, lim.Max)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil || lim.Cur < want {
		t.Fatalf("need %d open files, limit %d: %v", want, lim.Cur, err)
	}
}

func dial(t *testing.T, socket string) *net.UnixConn {
	t.Helper()
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: socket, Net: "unix"})
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	return c
}

// memInUse is heap plus goroutine stacks, after a GC.
func memInUse() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapInuse + ms.StackInuse
}

func TestIdleConnectionsDoNotBlockOthers(t *testing.T) {
	raiseFileLimit(t, 4096)
	const idle = 1000
	sys := startSystem(t, func(c *Config) { c.IdleTimeout = 3 * time.Second })
	before := memInUse()
	conns := make([]*net.UnixConn, idle)
	for i := range conns {
		conns[i] = dial(t, sys.Socket)
		defer conns[i].Close()
		// Half a request, never finished.
		if _, err := conns[i].Write([]byte("admin.vm.List+ dom0 na")); err != nil {
			t.Fatal(err)
		}
	}
	// Every idle connection is accepted and held by the gateway by now.
	bustest.CheckFor(t, 5*time.Second, 20*time.Millisecond, func() error {
		if got := roundTrip(t, sys.Socket, []byte(listAll)); !bytes.HasPrefix(got, []byte("0\x00dom0 class=AdminVM")) {
			return errors.New("list not served")
		}
		return nil
	})
	after := memInUse()
	grown := after - min(before, after)
	t.Logf("memory for %d idle connections: %d KiB (%d bytes each)", idle, grown>>10, grown/idle)
	if grown > 32<<20 {
		t.Errorf("idle connections hold %d MiB, want bounded (< 32 MiB)", grown>>20)
	}
	// The idle limit closes them without a response.
	for i, c := range conns {
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		b, err := io.ReadAll(c)
		if err != nil || len(b) != 0 {
			t.Fatalf("idle connection %d: read %q, %v; want EOF with no bytes", i, b, err)
		}
	}
}

func TestOversizedRequestAborts(t *testing.T) {
	sys := startSystem(t)
	head := []byte(listAll)
	exact := append(append([]byte{}, head...), bytes.Repeat([]byte("x"), 65536-len(head))...)
	if got := roundTrip(t, sys.Socket, exact); string(got) != "2\x00ProtocolError\x00\x00unexpected payload\x00" {
		t.Fatalf("request of exactly 64 KiB: %q", got)
	}
	over := append(exact, 'x')
	c := dial(t, sys.Socket)
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	_, werr := c.Write(over) // may fail with EPIPE once the gateway aborts
	_ = c.CloseWrite()
	b, rerr := io.ReadAll(c)
	if len(b) != 0 {
		t.Fatalf("oversized request answered %q (write err %v, read err %v)", b, werr, rerr)
	}
	// The gateway still serves.
	if got := roundTrip(t, sys.Socket, []byte(listAll)); !bytes.HasPrefix(got, []byte("0\x00dom0")) {
		t.Fatalf("after oversized request: %q", got)
	}
}

func TestGarbageNeverBreaksTheGateway(t *testing.T) {
	sys := startSystem(t)
	rng := rand.New(rand.NewPCG(1, 2))
	seeds := [][]byte{[]byte(listAll), []byte("admin.vm.property.Get+label dom0 name work\x00"), []byte("admin.Events+ dom0 name dom0\x00")}
	for i := 0; i < 300; i++ {
		req := append([]byte{}, seeds[i%len(seeds)]...)
		for j := rng.IntN(4); j >= 0; j-- {
			switch rng.IntN(3) {
			case 0:
				req[rng.IntN(len(req))] = byte(rng.IntN(256))
			case 1:
				req = req[:rng.IntN(len(req))]
			case 2:
				req = append(req, byte(rng.IntN(256)))
			}
			if len(req) == 0 {
				break
			}
		}
		c := dial(t, sys.Socket)
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		_, _ = c.Write(req)
		_ = c.CloseWrite()
		// admin.Events may stream forever; read only what arrives first.
		buf := make([]byte, 4096)
		_, _ = c.Read(buf)
		c.Close()
	}
	if got := roundTrip(t, sys.Socket, []byte(listAll)); !bytes.HasPrefix(got, []byte("0\x00dom0")) {
		t.Fatalf("after garbage: %q", got)
	}
}
