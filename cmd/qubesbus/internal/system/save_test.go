package system

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/qubesbus/qubesbus/bus/bustest"
)

// qubesd rewrites qubes.xml before it replies to a change; with SaveAfterReply the
// rewrite follows the reply. Either way the file ends up holding the change, and
// reads write nothing.
func TestQubesXMLSavedBeforeOrAfterTheReply(t *testing.T) {
	for _, after := range []bool{false, true} {
		t.Run(fmt.Sprintf("after=%v", after), func(t *testing.T) {
			sys := startSystem(t, func(c *Config) { c.SaveAfterReply = after })
			file := filepath.Join(filepath.Dir(sys.Socket), "data", "qubes.xml")
			writes := sys.Store.Writes()
			for i := 0; i < 20; i++ {
				roundTrip(t, sys.Socket, []byte("admin.vm.property.Get+label dom0 name work\x00"))
			}
			if n := sys.Store.Writes(); n != writes {
				t.Fatalf("reads wrote qubes.xml %d times", n-writes)
			}
			if got := roundTrip(t, sys.Socket, []byte("admin.vm.property.Set+label dom0 name work\x00red")); string(got) != "0\x00" {
				t.Fatalf("set: %q", got)
			}
			holds := func() error {
				b, err := os.ReadFile(file)
				if err != nil {
					return err
				}
				if !bytes.Contains(b, []byte(`<property name="label">red</property>`)) {
					return fmt.Errorf("qubes.xml does not hold the new label")
				}
				return nil
			}
			if !after {
				if err := holds(); err != nil {
					t.Fatalf("right after the reply: %v", err)
				}
				return
			}
			bustest.CheckFor(t, 10*time.Second, 10*time.Millisecond, holds)
		})
	}
}
