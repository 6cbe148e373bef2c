package bustest

import (
	"bufio"
	"errors"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Ready is the line a child prints on standard output once it serves.
const Ready = "ready"

// Child is the running test binary re-executed as another process (a service, a whole
// host), so that a test can SIGKILL it at an arbitrary point. The test binary's
// TestMain recognises the child by an environment variable of the caller's choosing and
// runs it instead of the tests; the child prints Ready once it serves.
type Child struct {
	cmd  *exec.Cmd
	done chan error // Wait's result, put back by each reader

	mu     sync.Mutex // guards stderr
	stderr strings.Builder
}

// StartChild starts the test binary with env added to the environment, and returns once
// it printed Ready, or fails the test if it exits first or is not ready within timeout.
// The process is killed at the end of the test if it still runs.
func StartChild(t testing.TB, timeout time.Duration, env ...string) *Child {
	t.Helper()
	c := &Child{done: make(chan error, 1)}
	c.cmd = exec.Command(os.Args[0], "-test.run=^$")
	c.cmd.Env = append(os.Environ(), env...)
	c.cmd.Stderr = (*childLog)(c)
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
			if sc.Text() == Ready && !ok {
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
		c.result()
	})
	select {
	case ok := <-ready:
		if !ok {
			t.Fatalf("child exited before it served: %v\n%s", c.result(), c.Log())
		}
	case <-time.After(timeout):
		t.Fatalf("child not serving after %s:\n%s", timeout, c.Log())
	}
	return c
}

// childLog collects the child's standard error.
type childLog Child

func (l *childLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.stderr.Write(p)
}

// Log is what the child wrote to standard error so far.
func (c *Child) Log() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.stderr.String()
}

// result waits for the exit and leaves it for the next reader.
func (c *Child) result() error {
	err := <-c.done
	c.done <- err
	return err
}

// Kill sends SIGKILL: nothing of the child's is closed, saved or flushed.
func (c *Child) Kill() { _ = c.cmd.Process.Kill() }

// Wait returns how the child ended, failing the test if it has not within timeout.
func (c *Child) Wait(t testing.TB, timeout time.Duration) error {
	t.Helper()
	select {
	case err := <-c.done:
		c.done <- err
		return err
	case <-time.After(timeout):
		t.Fatalf("child did not exit within %s:\n%s", timeout, c.Log())
		return nil
	}
}

// Stop sends SIGTERM and fails the test unless the child then exits cleanly.
func (c *Child) Stop(t testing.TB, timeout time.Duration) {
	t.Helper()
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	if err := c.Wait(t, timeout); err != nil {
		t.Fatalf("child exit: %v\n%s", err, c.Log())
	}
}

// WasKilled reports whether err, a Wait result, is the exit of a SIGKILLed process.
func WasKilled(err error) bool {
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		return false
	}
	ws, ok := ee.Sys().(syscall.WaitStatus)
	return ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL
}
