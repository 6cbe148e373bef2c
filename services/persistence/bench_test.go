package persistence

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"

	"github.com/qubesbus/qubesbus/schemas/configstore"

	"github.com/qubesbus/qubesbus/bus/bustest"
)

// BenchmarkStoreApply1000 measures accepted mutations on a host with 1009 qubes: each
// is validated incrementally and appended to the change log before it returns.
func BenchmarkStoreApply1000(b *testing.B) {
	ns := bustest.RunJetStream(b)
	s, err := New(Config{Host: testHost, DataDir: b.TempDir(), SeedXML: "../../testdata/qubes-1000.xml", Log: quiet})
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	if _, err := s.Serve(ctx, bustest.Connect(b, ns)); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = s.Close(ctx) })
	id := s.Snapshot().Config.Domains[500].ID
	client := configstore.Client{NC: bustest.Connect(b, ns), Host: testHost, Caller: configstore.Operator}
	var n atomic.Int64
	b.Run("direct", func(b *testing.B) {
		for b.Loop() {
			if _, err := s.Apply(ctx, setMemory(id, fmt.Sprint(n.Add(1)), false)); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("client", func(b *testing.B) {
		for b.Loop() {
			if _, err := client.Apply(ctx, setMemory(id, fmt.Sprint(n.Add(1)), false)); err != nil {
				b.Fatal(err)
			}
		}
	})
	// ChangesConfig from 32 concurrent callers: qubes.xml writes are shared.
	b.Run("client-changes-config-parallel", func(b *testing.B) {
		w0 := s.Writes()
		b.SetParallelism(16)
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if _, err := client.Apply(ctx, setMemory(id, fmt.Sprint(n.Add(1)), true)); err != nil {
					b.Error(err)
					return
				}
			}
		})
		b.ReportMetric(float64(s.Writes()-w0)/float64(b.N), "writes/op")
	})
}
