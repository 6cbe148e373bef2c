package envelope

import (
	"strings"
	"testing"
)

// The largest call the gateway accepts (64 KiB in all) fits a NATS request however
// its bytes escape: headers are not bound by max_control_line (only the
// "HPUB <subject> <reply> <hdr> <total>" line is), but header and payload together by
// max_payload (1 MiB by default, 8 MiB embedded). Calls are core NATS requests, so
// JetStream's 64 KiB limit on stored headers does not apply to them.
func TestLargestRequestFitsNATS(t *testing.T) {
	const limit = 64 << 10
	worst := strings.Repeat("\x01", limit-64) // every byte escapes to three
	for _, req := range []*Request{
		{Method: worst, Source: "dom0", Dest: "dom0"},
		{Method: "admin.vm.feature.Set", Arg: worst, Source: "dom0", Dest: "work", Payload: []byte("1")},
		{Method: "admin.vm.List", Source: "dom0", Dest: worst, ID: "zbjmzUpIQ67QOZUS67XDFR"},
	} {
		msg := req.Msg("qubes.v1.local.api._unknown")
		size := len("NATS/1.0\r\n\r\n") + len(msg.Data)
		for k, vs := range msg.Header {
			for _, v := range vs {
				size += len(k) + len(v) + 4
				if strings.ContainsAny(v, "\r\n\x00 ") {
					t.Fatalf("header %s holds a byte NATS would change", k)
				}
			}
		}
		if size > 3*limit+1024 || size > 1<<20 {
			t.Fatalf("request of %d bytes on NATS", size)
		}
		back, err := ParseRequest(msg.Header, msg.Data)
		if err != nil || back.Method != req.Method || back.Arg != req.Arg || back.Dest != req.Dest || back.ID != req.ID {
			t.Fatalf("round trip: %v", err)
		}
	}
}
