package gateway

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/bus/rpc"
	"github.com/qubesbus/qubesbus/bus/subject"
)

// tryAsk is ask that reports a failure to connect instead of failing the test.
func tryAsk(sock, req string) (string, error) {
	c, err := net.Dial("unix", sock)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := c.Write([]byte(req)); err != nil {
		return "", err
	}
	_ = c.(*net.UnixConn).CloseWrite()
	b, err := io.ReadAll(c)
	return string(b), err
}

// A socket deleted, or replaced by another file, while the gateway runs is opened
// again at the same path with the same mode; a call in progress meanwhile is answered.
func TestSocketRecreatedWhenDeletedOrReplaced(t *testing.T) {
	ns := bustest.RunJetStream(t)
	host := subject.ForHost("t")
	reg := rpc.NewRegistry(
		rpc.Method{Name: "admin.vm.List", Service: rpc.Properties, Arg: rpc.Forbidden, Payload: rpc.Forbidden},
		rpc.Method{Name: "admin.vm.Start", Service: rpc.VMLifecycle, Arg: rpc.Forbidden, Payload: rpc.Forbidden, Access: rpc.Execute},
	)
	_, sock := serveGateway(t, ns, Config{Host: host}, reg)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	entered, release := make(chan struct{}), make(chan struct{})
	released := false
	defer func() { // a failed test must not hold the gateway's stop
		if !released {
			close(release)
		}
	}()
	props := rpc.NewMux(reg, rpc.Properties, oneQube{}, slog.New(slog.DiscardHandler))
	props.Handle("admin.vm.List", func(context.Context, *rpc.Call) ([]byte, error) { return []byte("listed"), nil })
	life := rpc.NewMux(reg, rpc.VMLifecycle, oneQube{}, slog.New(slog.DiscardHandler))
	life.Handle("admin.vm.Start", func(context.Context, *rpc.Call) ([]byte, error) {
		close(entered)
		<-release
		return nil, nil
	})
	for _, m := range []*rpc.Mux{props, life} {
		if _, err := m.Serve(ctx, bustest.Connect(t, ns), host); err != nil {
			t.Fatal(err)
		}
	}
	const list = "admin.vm.List+ dom0 name dom0\x00"
	if got, err := tryAsk(sock, list); got != "0\x00listed" {
		t.Fatalf("before: %q, %v", got, err)
	}

	// A call in progress while its socket goes.
	held := make(chan string, 1)
	go func() {
		got, err := tryAsk(sock, "admin.vm.Start+ dom0 name dom0\x00")
		held <- fmt.Sprintf("%q %v", got, err)
	}()
	select {
	case <-entered:
	case <-time.After(30 * time.Second):
		t.Fatal("the held call did not reach its handler")
	}

	answers := func() error {
		fi, err := os.Lstat(sock)
		if err != nil {
			return err
		}
		if fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o660 {
			return fmt.Errorf("mode %v, want a socket 0660", fi.Mode())
		}
		got, err := tryAsk(sock, list)
		if err != nil {
			return err
		}
		if got != "0\x00listed" {
			return fmt.Errorf("answered %q", got)
		}
		return nil
	}

	// Deleted.
	if err := os.Remove(sock); err != nil {
		t.Fatal(err)
	}
	bustest.CheckFor(t, 30*time.Second, 20*time.Millisecond, answers)

	// Replaced by another (stale) socket moved over it.
	other := filepath.Join(filepath.Dir(sock), "other.sock")
	stale, err := net.ListenUnix("unix", &net.UnixAddr{Name: other, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	stale.SetUnlinkOnClose(false)
	stale.Close()
	if err := os.Rename(other, sock); err != nil {
		t.Fatal(err)
	}
	// The stale socket answers nobody: an answer comes from a fresh one.
	bustest.CheckFor(t, 30*time.Second, 20*time.Millisecond, answers)

	close(release)
	released = true
	select {
	case got := <-held:
		if got != `"0\x00" <nil>` {
			t.Fatalf("the call in progress got %s", got)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the call in progress was not answered")
	}
}
