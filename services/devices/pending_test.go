package devices

import (
	"testing"
	"time"
)

// A port being attached or detached by one instance reads as its frontend before the
// change while the mark holds, and a mark left by an instance that died stops
// counting after pendingFor, so a rescan then announces what it finds.
func TestPendingMark(t *testing.T) {
	now := time.Now()
	for _, tc := range []struct {
		v           string
		front       string
		pending     bool
		description string
	}{
		{"", "", false, "detached"},
		{"work", "work", false, "attached"},
		{pendingValue("", now), "", true, "being attached"},
		{pendingValue("work", now.Add(-time.Second)), "work", true, "being detached"},
		{pendingValue("work", now.Add(-2*pendingFor)), "work", false, "a dead instance's mark"},
		{"work" + pendingSep + "x", "work", false, "a mark without a time"},
	} {
		front, pending := frontOf(tc.v, now)
		if front != tc.front || pending != tc.pending {
			t.Errorf("%s: frontOf(%q) = %q, %v; want %q, %v", tc.description, tc.v, front, pending, tc.front, tc.pending)
		}
	}
}
