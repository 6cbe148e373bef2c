package bustest

import (
	"net"
	"testing"
)

// freePort returns a loopback TCP port that was free a moment ago (cluster route ports
// must be known before the servers start, so -1 cannot be used for them).
func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}
