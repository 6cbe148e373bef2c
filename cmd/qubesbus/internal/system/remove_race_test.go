package system

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/qubesbus/qubesbus/cmd/qubesbus/internal/access"

	"github.com/qubesbus/qubesbus/bus/subject"
	"github.com/qubesbus/qubesbus/services/vmlifecycle/simdriver"
)

// A Remove and a Start of the same halted qube race from two clients. qubesd runs them
// one after the other, so either the start wins (the remove fails: not halted) or the
// remove does (the start fails: no such qube). Never both: a domain left running for a
// qube that no longer exists.
func TestRemoveAndStartNeverBothWin(t *testing.T) {
	sys := startSystem(t)
	lab := simdriver.LabClient{NC: connectAs(t, sys, access.Lab), Host: subject.ForHost("test")}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	outcomes := map[string]int{}
	for i := 0; i < 25; i++ {
		name := fmt.Sprintf("race%d", i)
		if got := roundTrip(t, sys.Socket, []byte("admin.vm.Create.AppVM+fedora-41 dom0 name dom0\x00name="+name+" label=red")); string(got) != "0\x00" {
			t.Fatalf("create %s: %q", name, got)
		}
		var start, remove []byte
		var wg sync.WaitGroup
		wg.Add(2)
		go func() {
			defer wg.Done()
			start = roundTrip(t, sys.Socket, []byte("admin.vm.Start+ dom0 name "+name+"\x00"))
		}()
		go func() {
			defer wg.Done()
			remove = roundTrip(t, sys.Socket, []byte("admin.vm.Remove+ dom0 name "+name+"\x00"))
		}()
		wg.Wait()
		started, removed := string(start) == "0\x00", string(remove) == "0\x00"
		doms, err := lab.Domains(ctx)
		if err != nil {
			t.Fatal(err)
		}
		running := false
		for _, d := range doms {
			running = running || d.Name == name
		}
		switch {
		case started && removed:
			t.Fatalf("round %d: both the start and the remove of %s succeeded (domain running: %v)", i, name, running)
		case removed && running:
			t.Fatalf("round %d: %s was removed but its domain runs", i, name)
		case started && !strings.Contains(string(remove), "QubesVMNotHaltedError"):
			t.Fatalf("round %d: start won, remove answered %q", i, remove)
		case removed && !strings.Contains(string(start), "QubesVMNotFoundError"):
			t.Fatalf("round %d: remove won, start answered %q", i, start)
		}
		outcomes[fmt.Sprintf("start=%v remove=%v", started, removed)]++
		if started {
			roundTrip(t, sys.Socket, []byte("admin.vm.Kill+ dom0 name "+name+"\x00"))
		}
	}
	t.Logf("outcomes: %v", outcomes)
}
