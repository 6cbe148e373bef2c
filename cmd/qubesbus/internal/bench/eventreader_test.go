package bench

import (
	"bytes"
	"testing"
)

func TestScanFrame(t *testing.T) {
	frames := []struct {
		in   string
		want int64 // send time; 0: not a bench event
	}{
		{"1\x00\x00connection-established\x00\x00", 0},
		{"1\x00work\x00" + benchEvent + "\x00feature\x00bench\x00value\x001754000000123456789\x00\x00", 1754000000123456789},
		{"1\x00work\x00domain-start\x00start_guid\x00True\x00\x00", 0},
		{"1\x00work\x00" + benchEvent + "\x00feature\x00bench\x00value\x00x\x00\x00", 0},
		{"1\x00work\x00" + benchEvent + "\x00feature\x00bench\x00value\x009223372036854775808\x00\x00", 0},
	}
	var all []byte
	for _, f := range frames {
		all = append(all, f.in...)
	}
	for i, f := range frames {
		// Every proper prefix is incomplete.
		for n := range len(f.in) {
			if size, _, err := scanFrame(all[:n]); size != 0 || err != nil {
				t.Fatalf("frame %d, first %d bytes: size %d, %v", i, n, size, err)
			}
		}
		size, ns, err := scanFrame(all)
		if err != nil || size != len(f.in) || ns != f.want {
			t.Errorf("frame %d: size %d ns %d %v, want %d %d", i, size, ns, err, len(f.in), f.want)
		}
		all = all[size:]
	}
	if _, _, err := scanFrame([]byte("2\x00QubesException\x00\x00oops\x00")); err == nil {
		t.Error("an exception frame scanned as an event")
	}
	b := []byte(frames[1].in)
	if n := testing.AllocsPerRun(100, func() { scanFrame(b) }); n != 0 {
		t.Errorf("%.1f allocations per frame", n)
	}
}

func TestReaderConnKeepsPartialFrames(t *testing.T) {
	frame := []byte("1\x00work\x00" + benchEvent + "\x00feature\x00bench\x00value\x00100\x00\x00")
	stream := bytes.Repeat(frame, 3)
	c := &readerConn{buf: make([]byte, 128)}
	for _, chunk := range [][]byte{stream[:10], stream[10 : len(frame)+5], stream[len(frame)+5:]} {
		c.n += copy(c.buf[c.n:], chunk)
		if err := c.parse(1000); err != nil {
			t.Fatal(err)
		}
	}
	if len(c.lats) != 3 || c.lats[0] != 900 || c.n != 0 {
		t.Fatalf("latencies %v, %d bytes left", c.lats, c.n)
	}
}
