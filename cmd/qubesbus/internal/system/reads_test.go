package system

import (
	"strings"
	"testing"
)

// Reads answered in the gateway's process (rpc.Local), and the replies properties
// keeps per revision and runtime snapshot, show the client's own change and power
// operation in the very next call.
func TestReadsInProcessSeeOwnChanges(t *testing.T) {
	sys := startSystem(t)
	ok := func(got string) string {
		t.Helper()
		if !strings.HasPrefix(got, "0\x00") {
			t.Fatalf("call failed: %q", got)
		}
		return got
	}
	getAll := func() string { return ok(call(t, sys, "admin.vm.property.GetAll", "work", "", "")) }
	list := func() string { return ok(call(t, sys, "admin.vm.List", "dom0", "", "")) }
	if got := getAll(); !strings.Contains(got, "\nxid default=True type=int -1\n") {
		t.Fatalf("GetAll of a halted qube:\n%s", got)
	}
	list()
	for _, mem := range []string{"500", "600", "500"} {
		ok(call(t, sys, "admin.vm.property.Set", "work", "memory", mem))
		if got := getAll(); !strings.Contains(got, "\nmemory default=False type=int "+mem+"\n") {
			t.Fatalf("GetAll after setting memory to %s:\n%s", mem, got)
		}
		if got := call(t, sys, "admin.vm.property.Get", "work", "memory", ""); got != "0\x00default=False type=int "+mem {
			t.Fatalf("Get after setting memory to %s: %q", mem, got)
		}
	}
	if got := list(); !strings.Contains(got, "\nwork class=AppVM state=Halted ") {
		t.Fatalf("list before the start:\n%s", got)
	}
	ok(call(t, sys, "admin.vm.Start", "work", "", ""))
	if got := list(); !strings.Contains(got, "\nwork class=AppVM state=Running ") {
		t.Fatalf("list right after the start:\n%s", got)
	}
	if got := getAll(); strings.Contains(got, "\nxid default=True type=int -1\n") {
		t.Fatalf("GetAll right after the start still has no xid:\n%s", got)
	}
}
