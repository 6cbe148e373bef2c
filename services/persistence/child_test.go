package persistence

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/qubesbus/qubesbus/bus"
	"github.com/qubesbus/qubesbus/bus/subject"
)

// The crash and takeover tests run persistence instances as real processes (this test
// binary again, with childEnv set), so that SIGKILL ends them at an arbitrary point.
const (
	childEnv     = "QUBESBUS_PERSISTENCE_TEST_CHILD"
	childNATS    = "QUBESBUS_PERSISTENCE_TEST_NATS"
	childDataDir = "QUBESBUS_PERSISTENCE_TEST_DATA_DIR"
	childHost    = "QUBESBUS_PERSISTENCE_TEST_HOST"
	childSeed    = "QUBESBUS_PERSISTENCE_TEST_SEED"
)

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) != "" {
		os.Exit(runChild())
	}
	os.Exit(m.Run())
}

// runChild serves one instance until SIGTERM (then closes it cleanly) or SIGKILL.
// It prints "ready" once it serves.
func runChild() int {
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	startCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	nc, err := bus.Connect(startCtx, bus.ConnConfig{URL: os.Getenv(childNATS), Name: "persistence-test-child"}, log)
	if err != nil {
		log.Error("connect", "err", err)
		return 2
	}
	s, err := New(Config{Host: subject.ForHost(os.Getenv(childHost)), DataDir: os.Getenv(childDataDir), SeedXML: os.Getenv(childSeed), Log: log})
	if err != nil {
		log.Error("open", "err", err)
		return 2
	}
	if _, err := s.Serve(ctx, nc); err != nil {
		log.Error("serve", "err", err)
		return 2
	}
	fmt.Println("ready")
	<-ctx.Done()
	closeCtx, cancelClose := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancelClose()
	if err := s.Close(closeCtx); err != nil {
		log.Error("close", "err", err)
		return 1
	}
	_ = nc.Drain()
	return 0
}

// child is a persistence instance in another process.
type child struct {
	cmd    *exec.Cmd
	stderr syncBuffer
	done   chan error // Wait's result
}

// startChild starts an instance and waits until it serves.
func startChild(t *testing.T, natsURL, dataDir, host, seed string) *child {
	t.Helper()
	c := &child{done: make(chan error, 1)}
	c.cmd = exec.Command(os.Args[0], "-test.run=^$")
	c.cmd.Env = append(os.Environ(), childEnv+"=1", childNATS+"="+natsURL,
		childDataDir+"="+dataDir, childHost+"="+host, childSeed+"="+seed)
	c.cmd.Stderr = &c.stderr
	stdout, err := c.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := c.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ready := make(chan bool, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		ok := false
		for sc.Scan() {
			if sc.Text() == "ready" && !ok {
				ok = true
				ready <- true
			}
		}
		if !ok {
			ready <- false
		}
		c.done <- c.cmd.Wait()
	}()
	t.Cleanup(func() {
		_ = c.cmd.Process.Kill()
		<-c.done
		c.done <- nil
	})
	select {
	case ok := <-ready:
		if !ok {
			err := <-c.done
			c.done <- err // for Cleanup
			t.Fatalf("instance exited before it served: %v\n%s", err, c.stderr.String())
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("instance not serving after 60 s:\n%s", c.stderr.String())
	}
	return c
}

// kill sends SIGKILL: no Close, no final save, nothing flushed.
func (c *child) kill() { _ = c.cmd.Process.Kill() }

// wait returns how the process ended.
func (c *child) wait(t *testing.T) error {
	t.Helper()
	select {
	case err := <-c.done:
		c.done <- err // for Cleanup
		return err
	case <-time.After(60 * time.Second):
		t.Fatal("instance did not exit")
		return nil
	}
}

// stop sends SIGTERM and requires a clean exit.
func (c *child) stop(t *testing.T) {
	t.Helper()
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	if err := c.wait(t); err != nil {
		t.Fatalf("instance exit: %v\n%s", err, c.stderr.String())
	}
}

// wasKilled reports whether err is the exit of a SIGKILLed process.
func wasKilled(err error) bool {
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		return false
	}
	ws, ok := ee.Sys().(syscall.WaitStatus)
	return ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}
