package system

import (
	"bufio"
	"bytes"
	"net"
	"strings"
	"testing"
	"time"
)

func openStats(t *testing.T, socket, dest string) *eventStream {
	t.Helper()
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: socket, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.Write([]byte("admin.vm.Stats+ dom0 name " + dest + "\x00"))
	c.CloseWrite()
	s := &eventStream{c: c, r: bufio.NewReader(c)}
	f, err := s.next(10 * time.Second)
	if err != nil || string(f) != "1\x00\x00connection-established\x00\x00" {
		t.Fatalf("admin.vm.Stats %s: first frame %q %v", dest, f, err)
	}
	return s
}

var statsKeys = []string{"memory_kb", "memory_assigned_total", "memory_assigned_usable", "memory_with_swap_used", "cpu_time", "cpu_usage", "online_vcpus"}

func checkSample(t *testing.T, frame []byte, vm string) {
	t.Helper()
	f := strings.Split(string(frame), "\x00")
	// "1", subject, "vm-stats", k, v, …, "", ""
	if len(f) < 3+2*len(statsKeys) || f[0] != "1" || f[1] != vm || f[2] != "vm-stats" {
		t.Fatalf("not a vm-stats frame of %s: %q", vm, frame)
	}
	for i, k := range statsKeys {
		if f[3+2*i] != k {
			t.Fatalf("kwarg %d is %q, want %q: %q", i, f[3+2*i], k, frame)
		}
	}
}

func TestStatsStream(t *testing.T) {
	sys := startSystem(t)
	all := openStats(t, sys.Socket, "dom0")
	frame, err := all.next(10 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	checkSample(t, frame, "dom0") // only dom0 runs

	work := openStats(t, sys.Socket, "work")
	if got := roundTrip(t, sys.Socket, []byte("admin.vm.Start+ dom0 name work\x00")); string(got) != "0\x00" {
		t.Fatalf("start work: %q", got)
	}
	// The per-qube stream carries work's samples only.
	for i := 0; i < 2; i++ {
		frame, err := work.next(10 * time.Second)
		if err != nil {
			t.Fatal(err)
		}
		checkSample(t, frame, "work")
	}
	if got := roundTrip(t, sys.Socket, []byte("admin.vm.Stats+x dom0 name dom0\x00")); !bytes.Equal(got, []byte("2\x00ProtocolError\x00\x00unexpected argument\x00")) {
		t.Fatalf("Stats with an argument: %q", got)
	}
}
