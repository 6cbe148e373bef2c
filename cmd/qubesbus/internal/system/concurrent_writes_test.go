package system

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"
)

// Concurrent feature.Sets through the socket, two clients on one feature and two on
// features of their own. properties stores a call's pre-events before it takes its
// write lock (commit), so calls on different features may store theirs before an
// earlier change's event; calls on one feature stay wholly serial. So for each
// feature, as from qubesd's single loop: pre-event and event alternate, each event
// repeats its pre-event, and each oldvalue is the value the change before set.
func TestConcurrentWritesKeepEachFeaturesEvents(t *testing.T) {
	sys := startSystem(t)
	evs := openEvents(t, sys.Socket, "work")
	features := []string{"conc.same", "conc.same", "conc.a", "conc.b"}
	const perClient = 25
	var wg sync.WaitGroup
	for c, f := range features {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range perClient {
				if got := call(t, sys, "admin.vm.feature.Set", "work", f, fmt.Sprintf("%d-%d", c, i)); got != "0\x00" {
					t.Errorf("feature.Set %s: %q", f, got)
					return
				}
			}
		}()
	}
	wg.Wait()
	if t.Failed() {
		return
	}

	type frame struct{ event, value, old string }
	byFeature := map[string][]frame{}
	for n := 0; n < 2*len(features)*perClient; {
		b, err := evs.next(30 * time.Second)
		if err != nil {
			t.Fatalf("after %d events: %v", n, err)
		}
		fields := strings.Split(strings.TrimSuffix(string(b), "\x00\x00"), "\x00")
		event, kw := fields[2], map[string]string{}
		for i := 3; i+1 < len(fields); i += 2 {
			kw[fields[i]] = fields[i+1]
		}
		name, ok := strings.CutPrefix(kw["feature"], "conc.")
		if !ok || !strings.HasPrefix(event, "domain-feature-") {
			continue // not one of these calls' events
		}
		old, hasOld := kw["oldvalue"]
		if !hasOld {
			old = "(none)"
		}
		byFeature[name] = append(byFeature[name], frame{event, kw["value"], old})
		n++
	}
	for name, frames := range byFeature {
		last := "(none)"
		for i := 0; i+1 < len(frames); i += 2 {
			pre, set := frames[i], frames[i+1]
			switch {
			case pre.event != "domain-feature-pre-set:conc."+name || set.event != "domain-feature-set:conc."+name:
				t.Fatalf("conc.%s, events %d and %d: %s then %s, want the pre-event then the event", name, i, i+1, pre.event, set.event)
			case pre.value != set.value || pre.old != set.old:
				t.Fatalf("conc.%s, change %d: pre-event %+v, event %+v", name, i/2, pre, set)
			case set.old != last:
				t.Fatalf("conc.%s, change %d: oldvalue %q, the change before set %q", name, i/2, set.old, last)
			}
			last = set.value
		}
	}
	if got := len(byFeature["same"]); got != 2*2*perClient {
		t.Fatalf("%d events of conc.same, want %d", got, 2*2*perClient)
	}
}
