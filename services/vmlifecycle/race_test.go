package vmlifecycle_test

import (
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/qubesbus/qubesbus/bus/bustest"
	"github.com/qubesbus/qubesbus/services/vmlifecycle/simdriver"
)

// TestConcurrentPowerOperations fires 50 concurrent Start, Shutdown and Kill calls on
// one qube, and on a netvm chain, and checks that every call answers with one of
// qubesd's outcomes, that the qubes settle, and that each qube's events form valid
// sequences that agree with its final state.
func TestConcurrentPowerOperations(t *testing.T) {
	for _, tc := range []struct {
		name  string
		qubes []string
	}{
		{"same qube", []string{"sys-net"}},
		{"chained qubes", []string{"work", "sys-firewall", "sys-net"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			x := newHost(t, simdriver.Config{ShutdownLatency: 5 * time.Millisecond})
			mark := x.events.mark()
			ops := []struct{ method, arg string }{
				{"admin.vm.Start", ""}, {"admin.vm.Shutdown", ""}, {"admin.vm.Shutdown", "force"},
				{"admin.vm.Shutdown", "wait"}, {"admin.vm.Shutdown", "force+wait"}, {"admin.vm.Kill", ""},
			}
			var wg sync.WaitGroup
			errs := make(chan string, 50)
			for i := range 50 {
				op := ops[rand.IntN(len(ops))]
				if i%3 == 0 {
					op = ops[0] // enough starts to keep things moving
				}
				vm := tc.qubes[rand.IntN(len(tc.qubes))]
				wg.Add(1)
				go func() {
					defer wg.Done()
					r := x.call(op.method, vm, op.arg)
					if !allowedOutcome(op.method, vm, r) {
						errs <- fmt.Sprintf("%s+%s %s: %v", op.method, op.arg, vm, r)
					}
				}()
			}
			wg.Wait()
			close(errs)
			for e := range errs {
				t.Error("unexpected outcome:", e)
			}
			// Settle: every stop in flight completes (shutdown latency 5 ms).
			final := map[string]string{}
			bustest.CheckFor(t, 10*time.Second, 10*time.Millisecond, func() error {
				for _, q := range tc.qubes {
					st := x.state(q)
					if st != "Halted" && st != "Running" {
						return fmt.Errorf("%s still %s", q, st)
					}
					final[q] = st
				}
				return nil
			})
			// Every stop of a qube still running is announced once it is Halted; poll
			// until the events agree with the states, then require validity.
			bustest.CheckFor(t, 10*time.Second, 10*time.Millisecond, func() error {
				return checkSequences(x.events.since(mark), final)
			})
			t.Logf("%d events, final %v", len(x.events.since(mark)), final)
		})
	}
}

func allowedOutcome(method, vm string, r reply) bool {
	q := "'" + vm + "'"
	switch {
	case r == ok(""):
		return true
	case method == "admin.vm.Start":
		// A netvm killed while its client starts: the client start fails only in
		// ways qubesd's can.
		return r.Status == "exception"
	case method == "admin.vm.Kill":
		return r == exc("QubesVMNotStartedError", "Domain is powered off: "+q)
	case method == "admin.vm.Shutdown":
		return r == exc("QubesVMNotStartedError", "Domain is powered off: "+q) ||
			strings.HasPrefix(r.Content, "QubesVMInUseError: There are other VMs connected to this VM: ")
	}
	return false
}

// checkSequences validates each qube's events against the sequences of
// docs/spec/events.md §3 (the power-state transitions of §5.1) and checks that a qube
// ends up with a domain exactly when final says it is not Halted.
func checkSequences(lines []string, final map[string]string) error {
	perVM := map[string][]string{}
	for _, l := range lines {
		vm, rest, _ := strings.Cut(l, " ")
		name, _, _ := strings.Cut(rest, " ")
		perVM[vm] = append(perVM[vm], name)
	}
	for vm, want := range final {
		up, err := validSequence(perVM[vm])
		if err != nil {
			return fmt.Errorf("%s: %w\n%s", vm, err, strings.Join(perVM[vm], "\n"))
		}
		if up != (want != "Halted") {
			return fmt.Errorf("%s: events leave it up=%v but it is %s", vm, up, want)
		}
	}
	return nil
}

// validSequence consumes one qube's event names; it returns whether the qube has a
// domain at the end.
func validSequence(names []string) (up bool, err error) {
	i := 0
	next := func(want ...string) bool {
		if i+len(want) > len(names) {
			return false
		}
		for j, w := range want {
			if names[i+j] != w {
				return false
			}
		}
		i += len(want)
		return true
	}
	resets := []string{"property-reset:xid", "property-reset:stubdom_xid", "property-reset:start_time"}
	stop := append(append([]string{"domain-stopped"}, resets...), "domain-shutdown")
	for i < len(names) {
		at := i
		switch names[i] {
		case "domain-pre-start":
			if up {
				return up, fmt.Errorf("event %d: start while up", at)
			}
			if !next("domain-pre-start", "domain-verify-files") {
				return up, fmt.Errorf("event %d: pre-start without verify-files", at)
			}
			if next("domain-start-failed") {
				continue
			}
			if !next("domain-pre-spawn") {
				return up, fmt.Errorf("event %d: no pre-spawn", i)
			}
			if next("domain-start-failed") {
				continue
			}
			if !next(append(resets, "domain-spawn", "domain-qdb-create", "domain-pre-unpaused", "domain-unpaused")...) {
				return up, fmt.Errorf("event %d: broken spawn sequence", i)
			}
			up = true
			if next("domain-start") {
				continue
			}
			if !next("domain-start-failed") {
				return up, fmt.Errorf("event %d: start neither completed nor failed", i)
			}
		case "domain-stopped":
			if !up {
				return up, fmt.Errorf("event %d: stop while down", at)
			}
			if !next(stop...) {
				return up, fmt.Errorf("event %d: broken stop sequence", at)
			}
			up = false
		case "domain-pre-shutdown":
			if !up {
				return up, fmt.Errorf("event %d: shutdown while down", at)
			}
			i++
			next("domain-shutdown-failed")
		default:
			return up, fmt.Errorf("event %d: unexpected %s", at, names[i])
		}
	}
	return up, nil
}
